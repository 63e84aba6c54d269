"""A step-based runner for Hugging Face encoder-decoders (T5, Marian, BART shapes) on torch.

Each request's encoder runs once, when the request is admitted (requests admitted in the same
step share one padded encoder pass). Then every ``step()`` advances every running sequence by one
decoder token. Sequences admitted in the same step form a *cohort* that decodes as one padded
batch with one ``EncoderDecoderCache``: they share their decoder length, so the absolute decoder
positions of Marian and BART stay right without per-row position ids, which those models do not
accept. A step runs one batched decoder forward per cohort; rows that finish are dropped from
their cohort's cache (``batch_select_indices``). Greedy output equals
``model.generate(do_sample=False)`` token for token (tests check it for each shape).

Beam search (:mod:`lmaas.runtimes.seq2seq.beam`) gives a request ``num_beams`` rows of its
cohort: the encoder runs once per request and its output is repeated for the beams, and after
each step the cohort's rows (encoder output, mask and KV cache) are gathered by the beams'
origins, which reorders the beams and drops finished requests in one index. A beam request
sends nothing until it ends, then one delta per returned hypothesis (``n`` of them, as choices).
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from typing import Any

import msgspec
import torch

from lmaas.core.errors import InvalidRequestError, ModelLoadError, ModelNotReadyError
from lmaas.core.messages import GenerateRequest, ModelInfo, SamplingParams, SeqDelta, WorkerSpec
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.hf_loading import load_hf_model
from lmaas.runtimes.llm.sampling import make_generator, sample_token
from lmaas.runtimes.llm.sequence import FINISH_LENGTH, FINISH_STOP, GenerationSequence
from lmaas.runtimes.seq2seq.beam import BeamSearch, beam_log_probs
from lmaas.runtimes.seq2seq.decoding import DecodingRules, read_decoding_rules
from lmaas.runtimes.seq2seq.params import (
    check_sampling,
    encoder_input_ids,
    max_input_tokens,
    resolve_beams,
    resolve_max_tokens,
)

_log = logging.getLogger(__name__)
_WARMUP_ID = "__lmaas_warmup__"


class _Entry:
    """One request: its decoding state, encoder input, random stream and beams (if any)."""

    __slots__ = ("beam", "forced_eos", "generator", "input_ids", "sent_first", "seq")

    def __init__(
        self,
        seq: GenerationSequence,
        input_ids: list[int],
        generator: torch.Generator | None,
        beam: BeamSearch | None,
    ) -> None:
        self.seq = seq
        self.input_ids = input_ids
        self.generator = generator
        self.beam = beam
        self.sent_first = False
        self.forced_eos = False

    @property
    def num_rows(self) -> int:
        return 1 if self.beam is None else self.beam.settings.num_beams

    def last_ids(self, start_id: int) -> list[int]:
        """The decoder input of each of the request's rows."""
        if self.beam is None:
            return [self.seq.output_ids[-1] if self.seq.output_ids else start_id]
        return [beam[-1] if beam else start_id for beam in self.beam.beams]


class _Cohort:
    """Sequences admitted together: one padded batch with its encoder output and KV cache."""

    __slots__ = ("cache", "encoder_hidden", "encoder_mask", "entries")

    def __init__(
        self, entries: list[_Entry], encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor
    ) -> None:
        self.entries = entries
        self.encoder_hidden = encoder_hidden
        self.encoder_mask = encoder_mask
        self.cache: Any = None

    @property
    def num_rows(self) -> int:
        return int(self.encoder_hidden.shape[0]) if self.entries else 0

    def select(self, entries: list[_Entry], rows: list[int]) -> None:
        """Keep ``entries``, whose rows are the old ``rows`` in order (a row may repeat: a beam
        that two new beams extend)."""
        if rows == list(range(self.num_rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.encoder_hidden.device)
        self.entries = entries
        self.encoder_hidden = self.encoder_hidden.index_select(0, index)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        if self.cache is not None and rows:
            self.cache.batch_select_indices(index)

    def rows_of(self) -> list[tuple[_Entry, int]]:
        """Each entry with its first row."""
        out, start = [], 0
        for entry in self.entries:
            out.append((entry, start))
            start += entry.num_rows
        return out


class TorchSeq2SeqRunner:
    """Serves an encoder-decoder text model in safetensors HF layout.

    Implements :class:`lmaas.runtimes.base.GenerationRunner`. The request's ``prompt`` is the
    encoder input (the text to translate or summarise); the output streams as text deltas,
    detokenised incrementally. Decoding is greedy, sampled (temperature, top-k, top-p, seed) or
    beam search (``num_beams``, the checkpoint's by default; ``n`` up to ``num_beams`` returns
    the best beams as choices), with stop strings, stop token ids, ``min_tokens`` and
    ``ignore_eos``; logprobs, penalties, logit bias, min-p and ``response_format`` are refused
    with a 400. On a CPU, ``dtype=auto`` stays in float32 (T5 overflows in float16).

    Args:
        spec: The worker spec (model dir, device, dtype, context length, max batch size).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._model: Any = None
        self._encoder: Any = None
        self._tokenizer: Any = None
        self._rules = DecodingRules(decoder_start_id=0, eos_ids=frozenset())
        self._device = torch.device("cpu")
        self._max_input_tokens = 0
        self._max_output_tokens = 0
        self._vocab_size = 0
        self._pad_id = 0
        self._waiting: deque[_Entry] = deque()
        self._cohorts: list[_Cohort] = []
        self._takes_cache = False
        """The model's forward names its KV cache ``cache`` (newer transformers)."""

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> ModelInfo:
        """Load tokenizer, weights and decoding rules. Raises: ModelLoadError."""
        self._device = resolve_device(self._spec.device)
        dtype = resolve_dtype(self._spec.dtype, self._device, prefer_float32_on_cpu=True)
        configure_threads(num_threads_option(self._spec.options))
        self._model, self._tokenizer = load_hf_model(self._spec, "AutoModelForSeq2SeqLM", dtype)
        self._model.to(self._device)
        self._model.eval()
        self._encoder = self._model.get_encoder()
        self._takes_cache = "cache" in inspect.signature(self._model.forward).parameters
        config = self._model.config
        try:
            self._rules = read_decoding_rules(config, self._model.generation_config)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        self._vocab_size = int(config.vocab_size)
        self._pad_id = int(config.pad_token_id if config.pad_token_id is not None else 0)
        self._max_input_tokens = max_input_tokens(config, self._tokenizer, self._spec)
        decoder_limit = getattr(config, "max_position_embeddings", None)
        self._max_output_tokens = int(decoder_limit or self._max_input_tokens)
        _log.info("loaded %s on %s (%s)", self._spec.model_dir, self._device, dtype)
        return ModelInfo(
            context_length=self._max_input_tokens,
            dtype=dtype_name(dtype),
            device=str(self._device),
            max_input_tokens=self._max_input_tokens,
            vocab_size=self._vocab_size,
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Encode a short text and decode one token."""
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self.add_request(GenerateRequest(request_id=_WARMUP_ID, sampling=params, prompt="Hello"))
        while self.has_work():
            self.step()

    def health(self) -> bool:
        return self._model is not None

    # ------------------------------------------------------------------ requests

    def add_request(self, request: GenerateRequest) -> None:
        """Tokenise, validate and queue a request. Raises: InvalidRequestError."""
        if self._model is None:
            raise ModelNotReadyError("the model is not loaded yet")
        if self._is_known(request.request_id):
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        params = request.sampling
        check_sampling(params)
        input_ids = encoder_input_ids(
            request, self._tokenizer, self._vocab_size, self._max_input_tokens
        )
        max_tokens = resolve_max_tokens(params, self._rules, self._max_output_tokens)
        beams = resolve_beams(params, self._rules, max_tokens)
        beam = None if beams is None else BeamSearch(beams, self._device)
        seq = self._sequence(request.request_id, params, max_tokens)
        generator = make_generator(params.seed, self._device) if beam is None else None
        self._waiting.append(_Entry(seq, input_ids, generator, beam))

    def _sequence(
        self, request_id: str, params: SamplingParams, max_tokens: int
    ) -> GenerationSequence:
        return GenerationSequence(
            request_id,
            # The decoder start token is the detokeniser's left context, not the encoder input.
            [self._rules.decoder_start_id],
            params,
            max_tokens,
            self._tokenizer,
            self._rules.eos_ids,
        )

    def abort(self, request_id: str) -> None:
        """Drop a request, waiting or running; unknown ids are ignored."""
        self._waiting = deque(e for e in self._waiting if e.seq.request_id != request_id)
        for cohort in self._cohorts:
            kept = [(e, r) for e, r in cohort.rows_of() if e.seq.request_id != request_id]
            rows = [r + i for e, r in kept for i in range(e.num_rows)]
            cohort.select([e for e, _ in kept], rows)
        self._cohorts = [c for c in self._cohorts if c.entries]

    def has_work(self) -> bool:
        return bool(self._cohorts or self._waiting)

    def num_running(self) -> int:
        """Decoder rows in flight: one per sequence, ``num_beams`` per beam search."""
        return sum(c.num_rows for c in self._cohorts)

    def stats(self) -> dict[str, int]:
        return {
            "running": self.num_running(),
            "waiting": len(self._waiting),
            "cohorts": len(self._cohorts),
        }

    # ------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[SeqDelta]:
        """Admit waiting requests (one encoder pass), then decode one token for every row."""
        room = max(1, self._spec.max_batch_size) - self.num_running()
        admitted: list[_Entry] = []
        num_rows = 0
        while self._waiting:
            need = self._waiting[0].num_rows
            # A beam search wider than the batch still runs: alone.
            if num_rows + need > room and (admitted or self._cohorts):
                break
            admitted.append(self._waiting.popleft())
            num_rows += need
        if admitted:
            self._cohorts.append(self._encode(admitted))
        deltas: list[SeqDelta] = []
        for cohort in self._cohorts:
            deltas.extend(self._decode_step(cohort))
        self._cohorts = [c for c in self._cohorts if c.entries]
        return [d for d in deltas if d.request_id != _WARMUP_ID]

    def _encode(self, entries: list[_Entry]) -> _Cohort:
        width = max(len(e.input_ids) for e in entries)
        input_ids = torch.full((len(entries), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(entries), width), dtype=torch.long)
        for row, entry in enumerate(entries):
            input_ids[row, : len(entry.input_ids)] = torch.tensor(entry.input_ids)
            mask[row, : len(entry.input_ids)] = 1
        input_ids, mask = input_ids.to(self._device), mask.to(self._device)
        hidden = self._encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if any(e.beam is not None for e in entries):
            # Beams share their request's encoder pass; each beam gets a row of its own.
            rows = [i for i, e in enumerate(entries) for _ in range(e.num_rows)]
            index = torch.tensor(rows, dtype=torch.long, device=self._device)
            hidden, mask = hidden.index_select(0, index), mask.index_select(0, index)
        return _Cohort(entries, hidden, mask)

    def _decode_step(self, cohort: _Cohort) -> list[SeqDelta]:
        from transformers.modeling_outputs import BaseModelOutput

        start_id = self._rules.decoder_start_id
        last_ids = [token for e in cohort.entries for token in e.last_ids(start_id)]
        decoder_input = torch.tensor(last_ids, dtype=torch.long, device=self._device)[:, None]
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); take whichever the
        # installed version's model accepts.
        cache_kwarg = "cache" if self._takes_cache else "past_key_values"
        out = self._model(
            encoder_outputs=BaseModelOutput(last_hidden_state=cohort.encoder_hidden),
            attention_mask=cohort.encoder_mask,
            decoder_input_ids=decoder_input,
            use_cache=True,
            **{cache_kwarg: cohort.cache},
        )
        cohort.cache = out.cache if self._takes_cache else out.past_key_values
        logits = out.logits[:, -1].float()
        deltas: list[SeqDelta] = []
        kept: list[_Entry] = []
        rows: list[int] = []
        for entry, row in cohort.rows_of():
            if entry.beam is None:
                delta = self._advance(entry, logits[row])
                deltas.append(delta)
                if delta.finish_reason is None:
                    kept.append(entry)
                    rows.append(row)
                continue
            log_probs = beam_log_probs(
                entry.beam, logits[row : row + entry.num_rows], self._rules, entry.seq.params
            )
            origins = entry.beam.advance(log_probs)
            if entry.beam.done:
                deltas.extend(self._beam_results(entry))
            else:
                kept.append(entry)
                rows.extend(row + origin for origin in origins)
        cohort.select(kept, rows)
        return deltas

    def _advance(self, entry: _Entry, logits: torch.Tensor) -> SeqDelta:
        seq, params = entry.seq, entry.seq.params
        forced = self._rules.forced_token(len(seq.output_ids), seq.max_tokens, params.ignore_eos)
        if forced is not None:
            token_id = forced
            entry.forced_eos = forced == self._rules.forced_eos_id
        else:
            banned = self._rules.banned(seq.output_ids, params.ignore_eos) | seq.banned_ids()
            token_id = sample_token(logits, params, entry.generator, banned)
        delta = seq.append(token_id)
        changes: dict[str, Any] = {}
        if not entry.sent_first:
            entry.sent_first = True
            changes["prompt_tokens"] = len(entry.input_ids)
        if entry.forced_eos and delta.finish_reason is not None:
            # The config forced EOS because max_tokens ran out: the output was cut.
            changes["finish_reason"] = FINISH_LENGTH
        return msgspec.structs.replace(delta, **changes) if changes else delta

    def _beam_results(self, entry: _Entry) -> list[SeqDelta]:
        """One final delta per returned hypothesis: its whole text, as choice ``index``."""
        assert entry.beam is not None
        deltas = []
        request_id, params = entry.seq.request_id, entry.seq.params
        for index, token_ids in enumerate(entry.beam.best()):
            seq = (
                entry.seq
                if index == 0
                else self._sequence(request_id, params, entry.seq.max_tokens)
            )
            parts: list[str] = []
            for token_id in token_ids:
                parts.append(seq.append(token_id).text)
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is None:  # a hypothesis slot no beam filled
                parts.append(seq.close(FINISH_STOP))
            reason = seq.finish_reason
            if self._forced_eos_at_limit(seq):
                reason = FINISH_LENGTH
            deltas.append(
                SeqDelta(
                    request_id,
                    "".join(parts),
                    num_new_tokens=len(seq.output_ids),
                    finish_reason=reason,
                    prompt_tokens=len(entry.input_ids) if index == 0 else 0,
                    index=index,
                )
            )
        return deltas

    def _forced_eos_at_limit(self, seq: GenerationSequence) -> bool:
        """The config forced EOS because max_tokens ran out: the output was cut."""
        forced = self._rules.forced_eos_id
        ids = seq.output_ids
        return (
            forced is not None
            and not seq.params.ignore_eos
            and len(ids) == seq.max_tokens
            and ids[-1] == forced
        )

    # ------------------------------------------------------------------ validation

    def _is_known(self, request_id: str) -> bool:
        entries = [*self._waiting, *(e for c in self._cohorts for e in c.entries)]
        return any(e.seq.request_id == request_id for e in entries)
