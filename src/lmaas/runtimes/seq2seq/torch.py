"""A step-based runner for Hugging Face encoder-decoders (T5, Marian, BART shapes) on torch.

Each request's encoder runs once, when the request is admitted (requests admitted in the same
step share one padded encoder pass). Then every ``step()`` advances every running sequence by one
decoder token. Sequences admitted in the same step form a *cohort* that decodes as one padded
batch with one ``EncoderDecoderCache``: they share their decoder length, so the absolute decoder
positions of Marian and BART stay right without per-row position ids, which those models do not
accept. A step runs one batched decoder forward per cohort; rows that finish are dropped from
their cohort's cache (``batch_select_indices``). Greedy output equals
``model.generate(do_sample=False)`` token for token (tests check it for each shape).
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
from lmaas.runtimes.llm.sequence import FINISH_LENGTH, GenerationSequence
from lmaas.runtimes.seq2seq.decoding import DecodingRules, read_decoding_rules

_log = logging.getLogger(__name__)
_WARMUP_ID = "__lmaas_warmup__"
_UNSET_LIMIT = 1_000_000
"""Tokenizers without a maximum length report a huge ``model_max_length``."""


class _Entry:
    """One request: its decoding state, encoder input and random stream."""

    __slots__ = ("forced_eos", "generator", "input_ids", "sent_first", "seq")

    def __init__(
        self, seq: GenerationSequence, input_ids: list[int], generator: torch.Generator | None
    ) -> None:
        self.seq = seq
        self.input_ids = input_ids
        self.generator = generator
        self.sent_first = False
        self.forced_eos = False


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

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished or aborted sequences)."""
        if len(rows) == len(self.entries):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.encoder_hidden.device)
        self.entries = [self.entries[i] for i in rows]
        self.encoder_hidden = self.encoder_hidden.index_select(0, index)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        if self.cache is not None and rows:
            self.cache.batch_select_indices(index)


class TorchSeq2SeqRunner:
    """Serves an encoder-decoder text model in safetensors HF layout.

    Implements :class:`lmaas.runtimes.base.GenerationRunner`. The request's ``prompt`` is the
    encoder input (the text to translate or summarise); the output streams as text deltas,
    detokenised incrementally. Sampling supports temperature, top-k, top-p, seed, stop strings,
    stop token ids, ``min_tokens`` and ``ignore_eos``; logprobs, ``n > 1``, penalties, logit bias,
    min-p and ``response_format`` are refused with a 400. On a CPU, ``dtype=auto`` stays in
    float32 (T5 overflows in float16).

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
        self._max_input_tokens = _max_input_tokens(config, self._tokenizer, self._spec)
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
        _check_sampling(request.sampling)
        input_ids = self._input_ids(request)
        max_tokens = self._max_tokens(request.sampling)
        seq = GenerationSequence(
            request.request_id,
            # The decoder start token is the detokeniser's left context, not the encoder input.
            [self._rules.decoder_start_id],
            request.sampling,
            max_tokens,
            self._tokenizer,
            self._rules.eos_ids,
        )
        generator = make_generator(request.sampling.seed, self._device)
        self._waiting.append(_Entry(seq, input_ids, generator))

    def abort(self, request_id: str) -> None:
        """Drop a request, waiting or running; unknown ids are ignored."""
        self._waiting = deque(e for e in self._waiting if e.seq.request_id != request_id)
        for cohort in self._cohorts:
            rows = [i for i, e in enumerate(cohort.entries) if e.seq.request_id != request_id]
            cohort.keep(rows)
        self._cohorts = [c for c in self._cohorts if c.entries]

    def has_work(self) -> bool:
        return bool(self._cohorts or self._waiting)

    def num_running(self) -> int:
        return sum(len(c.entries) for c in self._cohorts)

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
        while self._waiting and len(admitted) < room:
            admitted.append(self._waiting.popleft())
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
        return _Cohort(entries, hidden, mask)

    def _decode_step(self, cohort: _Cohort) -> list[SeqDelta]:
        from transformers.modeling_outputs import BaseModelOutput

        last_ids = [
            e.seq.output_ids[-1] if e.seq.output_ids else self._rules.decoder_start_id
            for e in cohort.entries
        ]
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
        keep: list[int] = []
        for row, entry in enumerate(cohort.entries):
            delta = self._advance(entry, logits[row])
            deltas.append(delta)
            if delta.finish_reason is None:
                keep.append(row)
        cohort.keep(keep)
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

    # ------------------------------------------------------------------ validation

    def _is_known(self, request_id: str) -> bool:
        entries = [*self._waiting, *(e for c in self._cohorts for e in c.entries)]
        return any(e.seq.request_id == request_id for e in entries)

    def _input_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            raise InvalidRequestError(
                "seq2seq models take a prompt, not chat messages; use /v1/completions",
                param="messages",
            )
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = [i for i in ids if not 0 <= i < self._vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {self._vocab_size})",
                    param="prompt",
                )
        elif request.prompt:
            ids = self._tokenizer.encode(request.prompt, add_special_tokens=True)
        else:
            ids = []
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(ids) > self._max_input_tokens:
            raise InvalidRequestError(
                f"This model's maximum input length is {self._max_input_tokens} tokens, but the "
                f"prompt has {len(ids)} tokens. Please shorten the prompt.",
                param="prompt",
            )
        return list(ids)

    def _max_tokens(self, params: SamplingParams) -> int:
        if params.max_tokens is None:
            return self._max_output_tokens
        if not 1 <= params.max_tokens <= self._max_output_tokens:
            raise InvalidRequestError(
                f"max_tokens must lie in 1..{self._max_output_tokens} for this model, "
                f"got {params.max_tokens}",
                param="max_tokens",
            )
        return params.max_tokens


def _check_sampling(params: SamplingParams) -> None:
    """Refuse the sampling features this runner does not implement, naming the parameter."""
    unsupported = {
        "n": params.n != 1,
        "logprobs": params.logprobs is not None,
        "response_format": params.response_format is not None,
        "logit_bias": bool(params.logit_bias),
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "min_p": params.min_p > 0.0,
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise InvalidRequestError(f"'{name}' is not supported for seq2seq models", param=name)


def _max_input_tokens(config: Any, tokenizer: Any, spec: WorkerSpec) -> int:
    """The encoder's input limit: the model's positions, the tokenizer's maximum and the
    served ``context_length``, whichever is smallest (T5 has relative positions: no model
    limit of its own)."""
    limits = [
        int(getattr(config, "max_position_embeddings", 0) or 0),
        int(getattr(config, "n_positions", 0) or 0),
        int(getattr(tokenizer, "model_max_length", 0) or 0),
        spec.context_length or 0,
    ]
    positive = [limit for limit in limits if 0 < limit < _UNSET_LIMIT]
    if not positive:
        raise ModelLoadError(
            "cannot tell the encoder's maximum input length; set the context_length option"
        )
    return min(positive)
