# ruff: noqa: E501  (the C source keeps its own line lengths)
"""Small C kernels for bf16 on CPUs: attention from the paged cache, RMSNorm, RoPE + cache write.

Attention: every row of a step attends through one kernel call per layer, prompt tokens
included (a prompt token is a query whose context is its position + 1; the step's keys are
written to the cache first), so the kernel also replaces SDPA for prefill (16 prompts x 128
tokens: 2.5 ms per layer against 8.8). A decode row attends with one query per head to its own
context, so with grouped-query attention each (sequence, KV head) pair is a ``[group, head_dim] x [head_dim,
context]`` product: hundreds of tiny matmuls per layer. Batched into ``torch.matmul`` (the path
in ``attention.py``) they run at ~20 GB/s on the 2-core reference CPU (~50 GB/s of memory
reads), and they need the keys and values contiguous: the decode view (``decode_view.py``), its
appends and its rebuilds. The kernel reads each sequence's blocks where they lie in the cache
(prefetching the next block), with the scores, the softmax and the accumulation in float32 (the
matmul path rounds scores and probabilities to bf16), parallel over (sequence, KV head) with
OpenMP; AVX-512 BF16 dot products where the CPU has them, plain loops otherwise.

RMSNorm (with the residual add before it): eager, it is seven ATen ops and as many passes and
temporaries (float32 statistics, rounding to bf16 between steps); the kernel does one pass per
row with the same roundings (``fused.rms_norm`` / ``fused.add_rms_norm``), so outputs differ
only by the order of the sum of squares.

The C is compiled when a worker loads (``cc``, ~0.2 s) with the head size and group as
constants, and called through ``ctypes``; the shared object's ``libgomp.so.1`` resolves to the
one torch has already loaded, so both share one thread pool. Serving option ``cpu_kernels``:
``auto`` (default) uses them for bf16 on a CPU when they compile and their probe agrees with
the torch formulas, ``on`` fails the load otherwise, ``off`` keeps the torch paths.
``benchmarks/decode_kernel.py`` times the attention kernel against the matmuls.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.llm.paged.fused import add_rms_norm, rotary

_log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "on", "off")
_MAX_GROUP = 16

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <float.h>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__) && HEAD_DIM % 32 == 0
#include <immintrin.h>
#define VECTOR 1
#else
#define VECTOR 0
#endif

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v; v.u = ((uint32_t)x) << 16; return v.f;
}
static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    uint32_t u = v.u;
    u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even (no NaNs reach here) */
    return (uint16_t)(u >> 16);
}

int lmaas_max_threads(void) { return omp_get_max_threads(); }

/* Each row b is one query token (heads H = KV * GROUP of HEAD_DIM each, at q + b * q_stride)
   attending to the first contexts[b] positions of its sequence, whose blocks are
   tables + b * table_stride: a decode row, or a prompt token (causal: its position + 1).
   kv: one layer of the cache, [2, KV, NB, BS, HEAD_DIM], already holding this step's keys.
   out: [B, H * HEAD_DIM]; scratch: lmaas_max_threads() * GROUP * max_ctx floats. */
void lmaas_paged_attention(
    const uint16_t* q, int64_t q_stride, const uint16_t* kv, const int64_t* tables,
    int64_t table_stride, const int64_t* contexts, uint16_t* out, float* scratch,
    int64_t B, int64_t KV, int64_t NB, int64_t BS, int64_t max_ctx, float scale)
{
    const int64_t plane = NB * BS * HEAD_DIM;
    #pragma omp parallel
    {
    float* s = scratch + (int64_t)omp_get_thread_num() * GROUP * max_ctx;
    /* Chunks of 4 interleave the threads over rows, whose contexts may differ a lot. */
    #pragma omp for collapse(2) schedule(static, 4)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < KV; ++h) {
            const int64_t ctx = contexts[b];
            const int64_t* table = tables + b * table_stride;
            const uint16_t* kbase = kv + h * plane;
            const uint16_t* vbase = kv + (KV + h) * plane;
            float qf[GROUP][HEAD_DIM];
            float m[GROUP], sum[GROUP], acc[GROUP][HEAD_DIM];
#if VECTOR
            __m512bh qb[GROUP][HEAD_DIM / 32];
            __m512 va[GROUP][HEAD_DIM / 16];
            for (int g = 0; g < GROUP; ++g) {
                const uint16_t* qrow = q + b * q_stride + (h * GROUP + g) * HEAD_DIM;
                for (int c = 0; c < HEAD_DIM / 32; ++c)
                    qb[g][c] = (__m512bh)_mm512_loadu_si512(qrow + 32 * c);
                for (int c = 0; c < HEAD_DIM / 16; ++c) va[g][c] = _mm512_setzero_ps();
            }
#endif
            for (int g = 0; g < GROUP; ++g) {
                const uint16_t* qrow = q + b * q_stride + (h * GROUP + g) * HEAD_DIM;
                for (int d = 0; d < HEAD_DIM; ++d) qf[g][d] = bf16_to_f32(qrow[d]) * scale;
                m[g] = -FLT_MAX; sum[g] = 0.0f;
                for (int d = 0; d < HEAD_DIM; ++d) acc[g][d] = 0.0f;
            }
            for (int64_t start = 0; start < ctx; start += BS) {
                const int64_t n = ctx - start < BS ? ctx - start : BS;
                const uint16_t* k = kbase + table[start / BS] * BS * HEAD_DIM;
                if (start + BS < ctx) {  /* the next block: a 2 KB jump the prefetchers miss */
                    const char* next = (const char*)(kbase + table[start / BS + 1] * BS * HEAD_DIM);
                    for (int64_t o = 0; o < BS * HEAD_DIM * 2; o += 64) __builtin_prefetch(next + o);
                }
                for (int64_t i = 0; i < n; ++i) {
#if VECTOR
                    __m512bh kv_[HEAD_DIM / 32];
                    for (int c = 0; c < HEAD_DIM / 32; ++c)
                        kv_[c] = (__m512bh)_mm512_loadu_si512(k + i * HEAD_DIM + 32 * c);
                    for (int g = 0; g < GROUP; ++g) {
                        __m512 a = _mm512_setzero_ps();
                        for (int c = 0; c < HEAD_DIM / 32; ++c) a = _mm512_dpbf16_ps(a, kv_[c], qb[g][c]);
                        const float dot = _mm512_reduce_add_ps(a) * scale;
                        s[g * max_ctx + start + i] = dot;
                        m[g] = dot > m[g] ? dot : m[g];
                    }
#else
                    float kf[HEAD_DIM];
                    for (int d = 0; d < HEAD_DIM; ++d) kf[d] = bf16_to_f32(k[i * HEAD_DIM + d]);
                    for (int g = 0; g < GROUP; ++g) {
                        float dot = 0.0f;
                        for (int d = 0; d < HEAD_DIM; ++d) dot += qf[g][d] * kf[d];
                        s[g * max_ctx + start + i] = dot;
                        m[g] = dot > m[g] ? dot : m[g];
                    }
#endif
                }
            }
            {
                const char* first = (const char*)(vbase + table[0] * BS * HEAD_DIM);
                for (int64_t o = 0; o < BS * HEAD_DIM * 2; o += 64) __builtin_prefetch(first + o);
            }
            for (int g = 0; g < GROUP; ++g) {
                float* sg = s + g * max_ctx;
                float total = 0.0f;
                for (int64_t l = 0; l < ctx; ++l) { sg[l] = expf(sg[l] - m[g]); total += sg[l]; }
                sum[g] = total;
            }
            for (int64_t start = 0; start < ctx; start += BS) {
                const int64_t n = ctx - start < BS ? ctx - start : BS;
                const uint16_t* v = vbase + table[start / BS] * BS * HEAD_DIM;
                {
                    const int64_t nb = start + BS < ctx ? start / BS + 1 : -1;
                    const char* next = nb >= 0 ? (const char*)(vbase + table[nb] * BS * HEAD_DIM)
                                               : (const char*)(kbase + table[0] * BS * HEAD_DIM);
                    if (nb >= 0) for (int64_t o = 0; o < BS * HEAD_DIM * 2; o += 64) __builtin_prefetch(next + o);
                }
                for (int64_t i = 0; i < n; ++i) {
#if VECTOR
                    __m512 vf[HEAD_DIM / 16];
                    for (int c = 0; c < HEAD_DIM / 16; ++c) {
                        __m256i raw = _mm256_loadu_si256((const __m256i*)(v + i * HEAD_DIM + 16 * c));
                        vf[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                    }
                    for (int g = 0; g < GROUP; ++g) {
                        const __m512 p = _mm512_set1_ps(s[g * max_ctx + start + i]);
                        for (int c = 0; c < HEAD_DIM / 16; ++c) va[g][c] = _mm512_fmadd_ps(p, vf[c], va[g][c]);
                    }
#else
                    float vf[HEAD_DIM];
                    for (int d = 0; d < HEAD_DIM; ++d) vf[d] = bf16_to_f32(v[i * HEAD_DIM + d]);
                    for (int g = 0; g < GROUP; ++g) {
                        const float p = s[g * max_ctx + start + i];
                        for (int d = 0; d < HEAD_DIM; ++d) acc[g][d] += p * vf[d];
                    }
#endif
                }
            }
#if VECTOR
            for (int g = 0; g < GROUP; ++g)
                for (int c = 0; c < HEAD_DIM / 16; ++c) _mm512_storeu_ps(acc[g] + 16 * c, va[g][c]);
#endif
            for (int g = 0; g < GROUP; ++g) {
                uint16_t* orow = out + b * KV * GROUP * HEAD_DIM + (h * GROUP + g) * HEAD_DIM;
                const float inv = 1.0f / sum[g];
                for (int d = 0; d < HEAD_DIM; ++d) orow[d] = f32_to_bf16(acc[g][d] * inv);
            }
        }
    }
    }
}

/* One row per iteration. hidden_out = bf16(hidden + delta) when delta is given (the residual
   add); then x_out = bf16(weight * bf16(h * rsqrt(mean(h^2) + eps))) with h that row in float32:
   the roundings of the eager bf16 ops, so results differ only in the sum's order. */
void lmaas_add_rms_norm(
    const uint16_t* hidden, const uint16_t* delta, const uint16_t* weight, uint16_t* hidden_out,
    uint16_t* x_out, int64_t rows, int64_t width, float eps)
{
    #pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* h = hidden + r * width;
        uint16_t* xo = x_out + r * width;
        float ss = 0.0f;
        if (delta) {
            const uint16_t* d = delta + r * width;
            uint16_t* ho = hidden_out + r * width;
            for (int64_t i = 0; i < width; ++i) {
                const uint16_t sum = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(d[i]));
                const float f = bf16_to_f32(sum);
                ho[i] = sum;
                ss += f * f;
            }
            h = ho;
        } else {
            for (int64_t i = 0; i < width; ++i) { const float f = bf16_to_f32(h[i]); ss += f * f; }
        }
        const float inv = 1.0f / sqrtf(ss / (float)width + eps);
        for (int64_t i = 0; i < width; ++i)
            xo[i] = f32_to_bf16(bf16_to_f32(weight[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(h[i]) * inv)));
    }
}

/* RoPE for a step's packed rows, straight into place. qkv: [T, H + 2 KV, HEAD_DIM] (rows
   contiguous); cos, sin_signed: [T, HEAD_DIM] (rope.RopeTable rows). Writes q_out [T, H, HEAD_DIM]
   and the rotated keys and the values into one layer of the cache ([2, KV, NB, BS, HEAD_DIM]) at
   slots[t]. Rounds like the eager bf16 ops: bf16(bf16(x * cos) + bf16(roll(x) * sin)). */
static inline uint16_t rope1(uint16_t x, uint16_t c, uint16_t rolled, uint16_t sn) {
    const float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(x) * bf16_to_f32(c)));
    const float b = bf16_to_f32(f32_to_bf16(bf16_to_f32(rolled) * bf16_to_f32(sn)));
    return f32_to_bf16(a + b);
}

void lmaas_rotary_to_cache(
    const uint16_t* qkv, const uint16_t* cos, const uint16_t* sin, uint16_t* q_out, uint16_t* kv,
    const int64_t* slots, int64_t T, int64_t KV, int64_t NB, int64_t BS)
{
    const int64_t H = KV * GROUP, width = (H + 2 * KV) * HEAD_DIM, plane = NB * BS * HEAD_DIM;
    #pragma omp parallel for schedule(static) if (T >= 64)
    for (int64_t t = 0; t < T; ++t) {
        const uint16_t* row = qkv + t * width;
        const uint16_t* c = cos + t * HEAD_DIM;
        const uint16_t* sn = sin + t * HEAD_DIM;
        for (int64_t h = 0; h < H + KV; ++h) {
            const uint16_t* x = row + h * HEAD_DIM;
            uint16_t* o = h < H ? q_out + (t * H + h) * HEAD_DIM
                                : kv + (h - H) * plane + slots[t] * HEAD_DIM;
            /* roll(x, HEAD_DIM / 2): the halves swap (two loops, so both vectorize) */
            for (int d = 0; d < HEAD_DIM / 2; ++d) o[d] = rope1(x[d], c[d], x[d + HEAD_DIM / 2], sn[d]);
            for (int d = HEAD_DIM / 2; d < HEAD_DIM; ++d) o[d] = rope1(x[d], c[d], x[d - HEAD_DIM / 2], sn[d]);
        }
        for (int64_t h = 0; h < KV; ++h) {
            const uint16_t* x = row + (H + KV + h) * HEAD_DIM;
            uint16_t* o = kv + (KV + h) * plane + slots[t] * HEAD_DIM;
            for (int d = 0; d < HEAD_DIM; ++d) o[d] = x[d];
        }
    }
}
"""


_P, _I = ctypes.c_void_p, ctypes.c_int64
_ATTENTION_ARGS = [_P, _I, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float]
_NORM_ARGS = [_P, _P, _P, _P, _P, _I, _I, ctypes.c_float]
_ROTARY_ARGS = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I]


def _function(library: ctypes.CDLL, name: str, argtypes: Sequence[type]) -> Callable[..., None]:
    fn = getattr(library, name)
    fn.restype, fn.argtypes = None, list(argtypes)
    return fn  # type: ignore[no-any-return]


def kernel_mode(options: Mapping[str, str]) -> str:
    """The ``cpu_kernels`` serving option (``auto`` when unset). Raises: ModelLoadError."""
    mode = options.get("cpu_kernels", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ModelLoadError(
            f"serving option cpu_kernels must be one of {KERNEL_MODES}, got {mode!r}"
        )
    return mode


class CpuKernels:
    """The compiled kernels for one head size and group."""

    __slots__ = (
        "_attention",
        "_max_threads",
        "_norm",
        "_rotary",
        "_scratch",
        "group",
        "head_dim",
    )

    def __init__(
        self,
        library: ctypes.CDLL,
        head_dim: int,
        group: int,
    ) -> None:
        self._attention = _function(library, "lmaas_paged_attention", _ATTENTION_ARGS)
        self._norm = _function(library, "lmaas_add_rms_norm", _NORM_ARGS)
        self._rotary = _function(library, "lmaas_rotary_to_cache", _ROTARY_ARGS)
        max_threads = library.lmaas_max_threads
        max_threads.restype, max_threads.argtypes = ctypes.c_int, []
        self._max_threads: Callable[[], int] = max_threads
        self._scratch = torch.empty(0, dtype=torch.float32)
        self.head_dim = head_dim
        self.group = group

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``fused.rms_norm`` for a bf16 ``[T, width]`` (rows made contiguous if they are not)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._norm(
            x.data_ptr(), None, weight.data_ptr(), None, out.data_ptr(), x.shape[0], x.shape[1], eps
        )
        return out

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fused.add_rms_norm``: ``(hidden + delta, rms_norm(hidden + delta))`` in one pass."""
        hidden, delta = hidden.contiguous(), delta.contiguous()
        summed, out = torch.empty_like(hidden), torch.empty_like(hidden)
        self._norm(
            hidden.data_ptr(),
            delta.data_ptr(),
            weight.data_ptr(),
            summed.data_ptr(),
            out.data_ptr(),
            hidden.shape[0],
            hidden.shape[1],
            eps,
        )
        return summed, out

    def rotary_to_cache(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        layer_kv: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """``fused.rotary`` (models without q/k norms) and ``PagedKVCache.write`` in one pass:
        rotates q into a new ``[T, heads, head_dim]`` tensor and the keys, with the values,
        into ``layer_kv`` at ``slot_mapping``. ``cos``/``sin_signed``: ``RopeTable.lookup``."""
        tokens = qkv.shape[0]
        _, kv_heads, num_blocks, block_size, head_dim = layer_kv.shape
        qkv, cos, sin_signed = qkv.contiguous(), cos.contiguous(), sin_signed.contiguous()
        if not layer_kv.is_contiguous() or not slot_mapping.is_contiguous():
            raise ValueError("rotary kernel: the cache and the slots must be contiguous")
        q = qkv.new_empty(tokens, kv_heads * self.group, head_dim)
        self._rotary(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin_signed.data_ptr(),
            q.data_ptr(),
            layer_kv.data_ptr(),
            slot_mapping.data_ptr(),
            tokens,
            kv_heads,
            num_blocks,
            block_size,
        )
        return q

    def attention(
        self,
        q: torch.Tensor,
        layer_kv: torch.Tensor,
        tables: torch.Tensor,
        contexts: torch.Tensor,
        max_context: int,
        scale: float,
    ) -> torch.Tensor:
        """Attention of query rows ``q`` (``[B, heads, head_dim]`` bf16, rows may be strided;
        one token each: decode rows and prompt tokens alike) over the first ``contexts[b]``
        cached positions of their sequence; returns ``[B, heads * head_dim]``. The step's own
        keys and values must be in the cache already (causal prefill: a prompt token's context
        is its position + 1).

        Args:
            layer_kv: ``PagedKVCache.layer(i)``: ``[2, kv_heads, blocks, block_size, d]``.
            tables: ``[B, >= blocks needed]`` int64 physical blocks of each row's sequence,
                rows contiguous.
            contexts: ``[B]`` int64 positions each row attends to (its own included).
            max_context: ``max(contexts)``.
        """
        batch, heads, head_dim = q.shape
        _, kv_heads, num_blocks, block_size, _ = layer_kv.shape
        if q.stride(2) != 1 or q.stride(1) != head_dim or not layer_kv.is_contiguous():
            raise ValueError("decode attention kernel: unexpected operand layout")
        if tables.stride(1) != 1 or not contexts.is_contiguous():
            raise ValueError("decode attention kernel: tables and contexts must be contiguous")
        needed = self._max_threads() * self.group * max_context
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed, dtype=torch.float32)
        out = q.new_empty(batch, heads * head_dim)
        self._attention(
            q.data_ptr(),
            q.stride(0),
            layer_kv.data_ptr(),
            tables.data_ptr(),
            tables.stride(0),
            contexts.data_ptr(),
            out.data_ptr(),
            self._scratch.data_ptr(),
            batch,
            kv_heads,
            num_blocks,
            block_size,
            max_context,
            ctypes.c_float(scale),
        )
        return out


def build_cpu_kernels(
    *, head_dim: int, group: int, dtype: torch.dtype, device: torch.device, mode: str = "auto"
) -> CpuKernels | None:
    """Compile and probe the kernels; None where they do not apply or cannot be built.

    Raises:
        ModelLoadError: ``mode == "on"`` and the kernels are unavailable.
    """
    if mode == "off":
        return None
    why = _unsupported(head_dim, group, dtype, device)
    kernel = None
    if why is None:
        try:
            kernel = _compile(head_dim, group)
            why = _probe(kernel)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
    if why is None:
        _log.info(
            "CPU kernels for decode attention and RMSNorm (head_dim %d, group %d)", head_dim, group
        )
        return kernel
    if mode == "on":
        raise ModelLoadError(f"cpu_kernels=on, but the CPU kernels are unavailable: {why}")
    _log.info("no CPU kernels (decode attention by matmuls, eager norms): %s", why)
    return None


def _unsupported(head_dim: int, group: int, dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type != "cpu" or dtype != torch.bfloat16:
        return f"the kernel is for bf16 on a CPU, not {dtype} on {device.type}"
    if not 1 <= group <= _MAX_GROUP or head_dim % 16 or not 16 <= head_dim <= 256:
        return f"unsupported shape (head_dim {head_dim}, group {group})"
    if _compiler() is None:
        return "no C compiler (cc or gcc) on PATH"
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _compile(head_dim: int, group: int) -> CpuKernels:
    compiler = _compiler()
    assert compiler is not None  # checked by _unsupported
    defines = f"#define HEAD_DIM {head_dim}\n#define GROUP {group}\n"
    source = defines + _SOURCE
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    with tempfile.TemporaryDirectory(prefix="lmaas-kernel-") as tmp:
        src, lib = Path(tmp) / f"kernels_{digest}.c", Path(tmp) / f"kernels_{digest}.so"
        src.write_text(source, encoding="utf-8")
        flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
        done = subprocess.run(
            [compiler, *flags, "-o", str(lib), str(src), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        # The mapping outlives the file: the directory can go.
        library = ctypes.CDLL(str(lib))
    return CpuKernels(library, head_dim, group)


def reference_attention(
    q: torch.Tensor,
    layer_kv: torch.Tensor,
    tables: torch.Tensor,
    contexts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The kernel's formula in float32 torch ops, one sequence at a time (probe and tests)."""
    batch, heads, head_dim = q.shape
    kv_heads, block_size = layer_kv.shape[1], layer_kv.shape[3]
    out = torch.empty(batch, heads, head_dim, dtype=torch.float32)
    for b in range(batch):
        ctx = int(contexts[b])
        blocks = tables[b, : -(-ctx // block_size)]
        keys = layer_kv[0][:, blocks].reshape(kv_heads, -1, head_dim)[:, :ctx].float()
        values = layer_kv[1][:, blocks].reshape(kv_heads, -1, head_dim)[:, :ctx].float()
        queries = q[b].float().view(kv_heads, heads // kv_heads, head_dim)
        probs = (queries @ keys.transpose(-1, -2) * scale).softmax(-1)
        out[b] = (probs @ values).reshape(heads, head_dim)
    return out.reshape(batch, heads * head_dim).to(q.dtype)


def _probe(kernel: CpuKernels) -> str | None:
    """Run the kernels on small random inputs against :func:`reference_attention` and
    the eager norms."""
    generator = torch.Generator().manual_seed(0)
    kv_heads, block_size, num_blocks = 2, 4, 9
    heads, head_dim = kv_heads * kernel.group, kernel.head_dim
    layer_kv = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=generator)
    layer_kv = layer_kv.to(torch.bfloat16)
    q = torch.randn(3, heads, head_dim, generator=generator).to(torch.bfloat16)
    tables = torch.tensor([[4, 1, 7], [0, 0, 0], [8, 2, 3]], dtype=torch.long)
    contexts = torch.tensor([10, 1, 12], dtype=torch.long)
    got = kernel.attention(q, layer_kv, tables, contexts, 12, head_dim**-0.5).float()
    want = reference_attention(q, layer_kv, tables, contexts, head_dim**-0.5).float()
    if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
        return f"decode attention probe mismatch (max error {float((got - want).abs().max()):.3g})"
    hidden, delta, weight = (
        torch.randn(5, 96, generator=generator).to(torch.bfloat16) for _ in range(3)
    )
    weight = weight[0]
    summed, x = kernel.add_rms_norm(hidden, delta, weight, 1e-6)
    want_summed, want_x = add_rms_norm(hidden, delta, weight, 1e-6)
    if not torch.equal(summed, want_summed) or not torch.allclose(
        x.float(), want_x.float(), atol=2e-2, rtol=2e-2
    ):
        return "RMSNorm probe mismatch"
    if not _rotary_agrees(kernel, generator):
        return "RoPE probe mismatch"
    return None


def _rotary_agrees(kernel: CpuKernels, generator: torch.Generator) -> bool:
    kv_heads, heads, head_dim = 2, 2 * kernel.group, kernel.head_dim
    qkv = torch.randn(3, heads + 2 * kv_heads, head_dim, generator=generator).to(torch.bfloat16)
    cos, sin = (torch.randn(3, 1, head_dim, generator=generator).to(torch.bfloat16) for _ in "cs")
    slots = torch.tensor([5, 0, 9], dtype=torch.long)
    got_kv = torch.zeros(2, kv_heads, 3, 4, head_dim, dtype=torch.bfloat16)
    got_q = kernel.rotary_to_cache(qkv, cos, sin, got_kv, slots)
    want_q, want_k, want_v = rotary(qkv, cos, sin, None, heads, kv_heads, 1e-6)
    want_kv = torch.zeros_like(got_kv)
    flat = want_kv.view(2, kv_heads, -1, head_dim)
    flat[0].index_copy_(1, slots, want_k.transpose(0, 1))
    flat[1].index_copy_(1, slots, want_v.transpose(0, 1))
    return torch.equal(got_q, want_q) and torch.equal(got_kv, want_kv)
