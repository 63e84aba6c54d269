"""A simple continuous-batching runner for Hugging Face causal LMs on torch.

Each ``step()`` admits waiting requests up to ``max_batch_size`` and advances every running
sequence by one token. Each sequence keeps its own ``DynamicCache`` and is prefilled on its
first step: correct for any mix of lengths, but one forward per sequence per step. The paged-KV
engine replaces :meth:`TorchCausalLMRunner._next_logits` with one batched forward; the request
bookkeeping (``GenerationSequence``) and sampling stay as they are.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InvalidRequestError, ModelNotReadyError
from lmaas.core.messages import GenerateRequest, ModelInfo, SamplingParams, SeqDelta, WorkerSpec
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.hf_loading import load_hf_model
from lmaas.runtimes.llm.chat_template import ChatTemplate
from lmaas.runtimes.llm.hf_prompt import chat_template_of, eos_token_ids_of
from lmaas.runtimes.llm.prompt import (
    build_prompt_ids,
    refuse_beam_search,
    resolve_context_length,
    resolve_max_tokens,
)
from lmaas.runtimes.llm.sampling import make_generator, sample_token
from lmaas.runtimes.llm.sequence import GenerationSequence

_log = logging.getLogger(__name__)
_WARMUP_ID = "__lmaas_warmup__"


class _Running:
    """A sequence plus what the model needs for it (KV cache, random stream)."""

    __slots__ = ("cache", "generator", "seq")

    def __init__(self, seq: GenerationSequence, generator: torch.Generator | None) -> None:
        self.seq = seq
        self.generator = generator
        self.cache: Any = None


class TorchCausalLMRunner:
    """Serves a decoder-only LM (Llama, Qwen2, Mistral, GPT-2 shapes) in safetensors HF layout.

    Implements :class:`lmaas.runtimes.base.GenerationRunner`. Weights load with
    ``local_files_only``, ``use_safetensors`` and no remote code; the chat template comes from
    the tokenizer config and renders in a sandbox.

    Args:
        spec: The worker spec (model dir, device, dtype, context length, max batch size).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._model: Any = None
        self._tokenizer: Any = None
        self._template: ChatTemplate | None = None
        self._device = torch.device("cpu")
        self._context_length = 0
        self._vocab_size = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._waiting: deque[_Running] = deque()
        self._running: OrderedDict[str, _Running] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> ModelInfo:
        """Load tokenizer and weights. Raises: ModelLoadError with the cause."""
        self._device = resolve_device(self._spec.device)
        dtype = resolve_dtype(self._spec.dtype, self._device)
        configure_threads(num_threads_option(self._spec.options))
        self._model, self._tokenizer = load_hf_model(self._spec, "AutoModelForCausalLM", dtype)
        self._model.to(self._device)
        self._model.eval()
        config = self._model.config
        self._vocab_size = int(config.vocab_size)
        self._context_length = _context_length(config, self._spec.context_length)
        self._eos_ids = eos_token_ids_of(Path(self._spec.model_dir), self._tokenizer)
        self._template = chat_template_of(self._tokenizer)
        _log.info("loaded %s on %s (%s)", self._spec.model_dir, self._device, dtype)
        return ModelInfo(
            context_length=self._context_length,
            dtype=dtype_name(dtype),
            device=str(self._device),
        )

    def warmup(self) -> None:
        """Generate one token, so the first request does not pay one-off costs."""
        ids = self._tokenizer.encode("Hello", add_special_tokens=True) or [0]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self.add_request(
            GenerateRequest(request_id=_WARMUP_ID, sampling=params, prompt_token_ids=ids[:8])
        )
        while self._running or self._waiting:
            self.step()

    def health(self) -> bool:
        return self._model is not None

    # ------------------------------------------------------------------ requests

    def add_request(self, request: GenerateRequest) -> None:
        """Tokenize and queue a request. Raises: InvalidRequestError."""
        if self._model is None:
            raise ModelNotReadyError("the model is not loaded yet")
        if request.request_id in self._running or any(
            r.seq.request_id == request.request_id for r in self._waiting
        ):
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        refuse_beam_search(request)
        ids = build_prompt_ids(request, self._tokenizer, self._template, self._vocab_size)
        max_tokens = resolve_max_tokens(request, len(ids), self._context_length)
        seq = GenerationSequence(
            request.request_id,
            ids,
            request.sampling,
            max_tokens,
            self._tokenizer,
            self._eos_ids,
        )
        self._waiting.append(_Running(seq, make_generator(request.sampling.seed, self._device)))

    def abort(self, request_id: str) -> None:
        """Drop a request, waiting or running; its KV cache is released with it."""
        if self._running.pop(request_id, None) is None:
            self._waiting = deque(r for r in self._waiting if r.seq.request_id != request_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    # ------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[SeqDelta]:
        """Advance every running sequence by one token (prefilling newly admitted ones)."""
        while self._waiting and len(self._running) < max(1, self._spec.max_batch_size):
            entry = self._waiting.popleft()
            self._running[entry.seq.request_id] = entry
        deltas: list[SeqDelta] = []
        for request_id, entry in list(self._running.items()):
            logits = self._next_logits(entry)
            seq = entry.seq
            token_id = sample_token(logits, seq.params, entry.generator, seq.banned_ids())
            delta = seq.append(token_id)
            if delta.finish_reason is not None:
                del self._running[request_id]
            if request_id != _WARMUP_ID:
                deltas.append(delta)
        return deltas

    def _next_logits(self, entry: _Running) -> torch.Tensor:
        seq = entry.seq
        new_ids = seq.prompt_ids if entry.cache is None else seq.output_ids[-1:]
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self._device)
        out = self._model(
            input_ids=input_ids, past_key_values=entry.cache, use_cache=True, logits_to_keep=1
        )
        entry.cache = out.past_key_values
        logits: torch.Tensor = out.logits[0, -1]
        return logits


# ---------------------------------------------------------------------- loading helpers


def _context_length(config: Any, requested: int | None) -> int:
    native_value = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return resolve_context_length(int(native_value) if native_value else 0, requested)
