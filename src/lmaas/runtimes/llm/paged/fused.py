"""The small elementwise stages of a decoder layer, eager or compiled by torch inductor.

Between its four matmuls a Llama layer runs ~30 small ops (two RMSNorms with float32
statistics, the residual adds, rotary embedding, SiLU times up, the decode softmax in float32).
Each is a separate pass over memory and, on a CPU, a separate OpenMP parallel region: on a
machine whose cores are shared, every region waits for the slowest thread. ``torch.compile``
fuses each stage into one C++ loop. The matmuls, the KV-cache writes and the attention matmuls
stay eager (they already run oneDNN kernels; the cache is indexed per step).

:class:`LayerKernels` holds the stages; the eager set is the reference (its numerics are the
ones the exact-equality tests against transformers check in float32), the compiled set computes
the same formulas (float32 statistics, same rounding points) in fused loops, so results differ
only by the order of float additions inside a row.

Shapes: the token count (and the decode batch and context) change every step, so the stages
are compiled with automatic dynamic sizes (the hidden size stays static); :func:`warm_up` runs
each at a few sizes, so that the specialisations torch makes (a size of 1, then a dynamic size)
are built before the worker reports ready rather than during a running stream.

Measured on the reference CPU (``docs/benchmarks.md``, 2026-11-27): at decode sizes the
compiled stages are no faster than ATen's (a batch's rows sit in L2; the ops are not
memory-bound), at prefill sizes they save ~1% of a run, and the engine A/B came out even; so the
``compile`` serving option's ``auto`` stays eager. Llama-family models only (GPT-2 is eager).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.llm.paged.rope import apply_rope

COMPILE_MODES = ("auto", "on", "off")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (float32 statistics, weight in model dtype)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add, then RMSNorm: ``(hidden + delta, rms_norm(hidden + delta))``."""
    hidden = hidden + delta
    return hidden, rms_norm(hidden, weight, eps)


def rotary(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    qk_norm: torch.Tensor | None,
    heads: int,
    kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv`` (``[T, heads + 2 kv_heads, d]``), normalise q/k per head (Qwen3) and rotate
    them; returns ``(q, k, v)``. ``cos``/``sin_signed``: ``[T, 1, d]`` (see ``rope.RopeTable``).
    """
    qk = qkv[:, : heads + kv_heads]
    if qk_norm is not None:
        qk = rms_norm(qk, qk_norm, eps)
    qk = apply_rope(qk, cos, sin_signed)
    return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection output ``[T, 2 * intermediate]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def decode_softmax(scores: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities in float32 (bf16 would lose most of the mass's precision),
    returned in the scores' dtype. ``bias`` (float32) broadcasts over ``scores`` (-inf masks).

    ``bias + scale * scores`` in one op (the bf16 scores are widened as they are read) gives
    bit-for-bit the values of ``scores.float() * scale + bias`` with two fewer passes."""
    return torch.add(bias, scores, alpha=scale).softmax(dim=-1).to(scores.dtype)


@dataclass(frozen=True, slots=True)
class LayerKernels:
    """The stages a layer calls; all eager, or all compiled (``compiled=True``)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    decode_softmax: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    compiled: bool = False


EAGER = LayerKernels(rms_norm, add_rms_norm, rotary, silu_mul, decode_softmax)


def compile_mode(options: Mapping[str, str]) -> str:
    """The ``compile`` serving option (``auto`` when unset). Raises: ModelLoadError."""
    mode = options.get("compile", "auto").strip().lower() or "auto"
    if mode not in COMPILE_MODES:
        raise ModelLoadError(f"serving option compile must be one of {COMPILE_MODES}, got {mode!r}")
    return mode


def wants_compile(mode: str, device: torch.device) -> bool:
    """Whether to compile: ``on`` does, ``off`` does not; ``auto`` picks what measured faster
    for the device. On the reference CPU (2 cores, AVX-512 bf16) the compiled stages were no
    faster (``docs/benchmarks.md``, 2026-11-27: 0.94-0.98x in-process), so ``auto`` is eager
    there; CUDA is eager too until the GPU A/B (``benchmarks/gpu_run.sh``) says otherwise."""
    del device  # no device measured a win yet
    return mode == "on"


def compiled_kernels() -> LayerKernels:
    """The stages wrapped in ``torch.compile`` (inductor, dynamic sizes). Compilation itself
    happens lazily, on the first call per size class (:meth:`warm_up` forces it)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(fn, dynamic=None, fullgraph=True)

    return LayerKernels(
        wrap(rms_norm),
        wrap(add_rms_norm),
        wrap(rotary),
        wrap(silu_mul),
        wrap(decode_softmax),
        compiled=True,
    )


def warm_up(
    kernels: LayerKernels,
    *,
    hidden_size: int,
    intermediate_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    qk_norm: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> float:
    """Call every stage at token counts 1, 2 and 3 (a size of 1 is its own specialisation) and
    the decode softmax at a few batch/context sizes; returns the seconds it took."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    norm_weight = randn(hidden_size)
    qk_weight = randn(heads + kv_heads, head_dim) if qk_norm else None
    with torch.inference_mode():
        for tokens in (2, 3, 1):
            hidden = randn(tokens, hidden_size)
            kernels.rms_norm(hidden, norm_weight, 1e-6)
            kernels.add_rms_norm(hidden, randn(tokens, hidden_size), norm_weight, 1e-6)
            qkv = randn(tokens, heads + 2 * kv_heads, head_dim)
            cos, sin = randn(tokens, 1, head_dim), randn(tokens, 1, head_dim)
            kernels.rotary(qkv, cos, sin, qk_weight, heads, kv_heads, 1e-6)
            kernels.silu_mul(randn(tokens, 2 * intermediate_size))
            group = heads // kv_heads
            for context in (16 * tokens, 16 * tokens + 32):
                scores = randn(kv_heads, tokens, group, context)
                bias = torch.zeros(tokens, 1, context, device=device)
                kernels.decode_softmax(scores, bias, head_dim**-0.5)
    return time.perf_counter() - start
