"""The torch model runner of the LLM engine: our own decoders over a paged KV cache.

Implements ``lmaas.engine.llm.protocol.ModelRunner`` structurally (runtimes never import the
engine). One :meth:`PagedModelRunner.execute` call is one engine step: block copies, one packed
forward over every slot's new tokens, logits for the sampling rows only, then the sampler.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from lmaas.core.errors import ModelLoadError, ModelNotReadyError
from lmaas.core.messages import ModelInfo, WorkerSpec
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.llm.batch import KVCacheLayout, Sampled, SeqSlot, StepBatch
from lmaas.runtimes.llm.paged.config import GPT2_STYLE, DecoderConfig, read_decoder_config
from lmaas.runtimes.llm.paged.cpu_kernels import CpuKernels, build_cpu_kernels, kernel_mode
from lmaas.runtimes.llm.paged.decode_view import DEFAULT_VIEW_BYTES, DecodeView
from lmaas.runtimes.llm.paged.fused import (
    EAGER,
    LayerKernels,
    compile_mode,
    compiled_kernels,
    wants_compile,
    warm_up,
)
from lmaas.runtimes.llm.paged.kv_cache import (
    PagedKVCache,
    blocks_for_budget,
    bytes_per_block,
    default_budget_bytes,
)
from lmaas.runtimes.llm.paged.models.base import CausalModel
from lmaas.runtimes.llm.paged.models.gpt2 import GPT2Model
from lmaas.runtimes.llm.paged.models.llama import LlamaModel
from lmaas.runtimes.llm.paged.step import build_step_inputs
from lmaas.runtimes.llm.paged.weights import CheckpointReader
from lmaas.runtimes.llm.prompt import resolve_context_length

_log = logging.getLogger(__name__)


class SlotSampler(Protocol):
    """The sampler's interface as the runner calls it (``lmaas.runtimes.llm.sampler.Sampler``)."""

    def sample(self, logits: torch.Tensor, slots: Sequence[SeqSlot]) -> list[Sampled]:
        """One token per row of ``logits`` (float32 ``[len(slots), vocab]``)."""
        ...

    def free(self, seq_ids: Iterable[int]) -> None:
        """Drop per-sequence state (seeded generators) of finished sequences."""
        ...


class PagedModelRunner:
    """Loads an HF safetensors decoder into our own modules and runs engine steps.

    Supported: Llama, Mistral, Qwen2, Qwen3 and GPT-2 checkpoints (``config.json`` +
    ``*.safetensors``, sharded or not).

    Args:
        spec: Model directory, device, dtype, context length and serving options
            (``num_threads``).
        sampler: Turns logits into tokens; default ``lmaas.runtimes.llm.sampler.Sampler``.
        decode_view_bytes: Memory for the decode batch's contiguous K/V view
            (``decode_view.DecodeView``); 0 disables it (attention then gathers every step).
            It is taken out of the KV-cache budget, never added to it; with the decode kernel
            (``cpu_kernels.py``) no view is needed and nothing is reserved.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        sampler: SlotSampler | None = None,
        decode_view_bytes: int = DEFAULT_VIEW_BYTES,
    ) -> None:
        self._spec = spec
        self._sampler = sampler
        self._decode_view_bytes = decode_view_bytes
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._config: DecoderConfig | None = None
        self._model: CausalModel | None = None
        self._cache: PagedKVCache | None = None
        self._view: DecodeView | None = None
        self._cpu_kernels: CpuKernels | None = None
        self._context_length = 0

    @property
    def compiled(self) -> bool:
        """Whether the layers run the inductor-compiled elementwise stages (``fused.py``)."""
        return isinstance(self._model, LlamaModel) and self._model.kernels.compiled

    @property
    def cpu_kernels(self) -> bool:
        """Whether decode attention and RMSNorm run the C kernels (``cpu_kernels.py``; serving
        option ``cpu_kernels``): attention then reads the cache directly, with no decode view."""
        return self._cpu_kernels is not None

    @property
    def config(self) -> DecoderConfig:
        if self._config is None:
            raise ModelNotReadyError("the model is not loaded yet")
        return self._config

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def load(self) -> ModelInfo:
        """Read the config and weights (fusing projections) onto the device.

        Raises:
            ModelLoadError: missing files, unsupported architecture or feature, missing tensors,
                or no sampler implementation available.
        """
        model_dir = Path(self._spec.model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        self._device = resolve_device(self._spec.device)
        self._dtype = resolve_dtype(self._spec.dtype, self._device)
        configure_threads(num_threads_option(self._spec.options))
        config = read_decoder_config(model_dir)
        self._context_length = _context_length(config, self._spec.context_length)
        model_class = GPT2Model if config.style == GPT2_STYLE else LlamaModel
        with torch.inference_mode(), CheckpointReader(model_dir, self._dtype, self._device) as r:
            model = model_class(config, r, self._dtype, self._device)
        self._cpu_kernels = build_cpu_kernels(
            head_dim=config.head_dim,
            group=config.num_heads // config.num_kv_heads,
            dtype=self._dtype,
            device=self._device,
            mode=kernel_mode(self._spec.options),
        )
        if isinstance(model, LlamaModel):
            model.kernels = self._kernels(config)
        self._model = model
        self._config = config
        if self._sampler is None:
            self._sampler = _default_sampler(self._device)
        _log.info(
            "loaded %s (%s) on %s in %s", model_dir, config.architecture, self._device, self._dtype
        )
        return ModelInfo(
            context_length=self._context_length,
            dtype=dtype_name(self._dtype),
            device=str(self._device),
            vocab_size=config.vocab_size,
        )

    def _kernels(self, config: DecoderConfig) -> LayerKernels:
        """Compiled stages when the ``compile`` serving option asks for them (``fused.py``),
        warmed up now, before the worker reports ready, so no running stream waits on a
        compiler. A compile failure fails the load under ``on``; a mode that only prefers
        compiling falls back to eager."""
        mode = compile_mode(self._spec.options)
        if not wants_compile(mode, self._device):
            if self._cpu_kernels is None:
                return EAGER
            # The same formulas, one C pass per row (cpu_kernels.py).
            return dataclasses.replace(
                EAGER,
                rms_norm=self._cpu_kernels.rms_norm,
                add_rms_norm=self._cpu_kernels.add_rms_norm,
            )
        kernels = compiled_kernels()
        try:
            seconds = warm_up(
                kernels,
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                heads=config.num_heads,
                kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                qk_norm=config.qk_norm,
                dtype=self._dtype,
                device=self._device,
            )
        except Exception as exc:  # inductor raises many types (BackendCompilerFailed, OSError)
            if mode == "on":
                raise ModelLoadError(
                    f"torch.compile failed (serving option compile=on): {exc}"
                ) from exc
            _log.warning("torch.compile unavailable, running eager: %s", exc)
            return EAGER
        _log.info("compiled the layer stages with torch inductor in %.1f s", seconds)
        return kernels

    def allocate_kv_cache(
        self, budget_bytes: int | None, block_size: int, max_useful_tokens: int | None = None
    ) -> KVCacheLayout:
        """Allocate the paged cache (``budget_bytes=None``: see ``kv_cache.default_budget_bytes``,
        capped at ``max_useful_tokens`` — no more than the scheduler can ever fill).

        Raises:
            ModelLoadError: the model is not loaded, or not even one full context fits.
        """
        config = self.config
        if block_size < 1:
            raise ModelLoadError(f"block_size must be positive, got {block_size}")
        shape = {"num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads}
        shape["head_dim"] = config.head_dim
        block_bytes = bytes_per_block(**shape, block_size=block_size, dtype=self._dtype)
        if budget_bytes is None:
            budget_bytes = default_budget_bytes(
                self._device, fraction=_fraction_option(self._spec.options)
            )
            if max_useful_tokens is not None:
                useful_blocks = -(-max(max_useful_tokens, self._context_length) // block_size)
                budget_bytes = min(budget_bytes, useful_blocks * block_bytes)
        # The decode view is a cache of the same K/V: it lives inside the budget, taking at
        # most its configured size and never the blocks one full context needs. The decode
        # kernel reads the cache itself and needs no view.
        needed = -(-self._context_length // block_size)
        wanted = 0 if self._cpu_kernels is not None else self._decode_view_bytes
        view_bytes = max(0, min(wanted, budget_bytes - needed * block_bytes))
        num_blocks = blocks_for_budget(
            budget_bytes - view_bytes,
            block_bytes,
            block_size=block_size,
            context_length=self._context_length,
        )
        self._cache = self._view = None  # release the old cache before allocating the new one
        try:
            self._cache = PagedKVCache(
                **shape,
                num_blocks=num_blocks,
                block_size=block_size,
                dtype=self._dtype,
                device=self._device,
            )
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise ModelLoadError(f"cannot allocate a KV cache of {budget_bytes} bytes") from exc
        self._view = DecodeView(self._cache, view_bytes)
        return KVCacheLayout(
            block_size=block_size,
            num_blocks=num_blocks,
            bytes_per_block=block_bytes,
            extra_bytes=view_bytes,
        )

    @torch.inference_mode()
    def compute_logits(self, batch: StepBatch) -> torch.Tensor:
        """Run the step's forward; float32 logits ``[num_sampled, vocab]`` in slot order.

        Raises:
            ModelNotReadyError: before :meth:`load` and :meth:`allocate_kv_cache`.
        """
        if self._model is None or self._cache is None or self._view is None:
            raise ModelNotReadyError("load() and allocate_kv_cache() must run before execute()")
        self._cache.copy_blocks(batch.block_copies)
        if not batch.slots:
            self._view.invalidate()
            return torch.empty(0, self.config.vocab_size, dtype=torch.float32)
        inputs = build_step_inputs(
            batch.slots, self._cache.block_size, self._device, kernel=self._cpu_kernels
        )
        if inputs.decode is None:
            self._view.invalidate()
        else:
            copied = bool(batch.block_copies)
            inputs.decode.view = self._view.plan(inputs.decode, batch.freed_seq_ids, copied)
        try:
            hidden = self._model.hidden_states(inputs, self._cache)
        except BaseException:
            self._view.invalidate()  # some layers may have appended, others not
            raise
        return self._model.logits(hidden).float()  # hidden holds the sampled rows only

    def execute(self, batch: StepBatch) -> list[Sampled]:
        """Run one step; one :class:`Sampled` per slot with ``sample=True``, in slot order."""
        logits = self.compute_logits(batch)
        sampler = self._sampler
        if sampler is None:
            raise ModelNotReadyError("load() must run before execute()")
        if batch.freed_seq_ids:
            sampler.free(batch.freed_seq_ids)
        sampled_slots = [slot for slot in batch.slots if slot.sample]
        if not sampled_slots:
            return []
        with torch.inference_mode():
            return sampler.sample(logits, sampled_slots)


def _default_sampler(device: torch.device) -> SlotSampler:
    try:
        from lmaas.runtimes.llm.sampler import Sampler
    except ImportError as exc:
        raise ModelLoadError(
            "lmaas.runtimes.llm.sampler.Sampler is not available; pass sampler= explicitly"
        ) from exc
    sampler: SlotSampler = Sampler(device)
    return sampler


def _fraction_option(options: Mapping[str, str]) -> float | None:
    """``kv_cache_fraction``: the share of free memory the KV cache takes without a byte budget."""
    raw = options.get("kv_cache_fraction")
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ModelLoadError(f"kv_cache_fraction must be a number, got {raw!r}") from None


def _context_length(config: DecoderConfig, requested: int | None) -> int:
    return resolve_context_length(config.max_positions, requested)
