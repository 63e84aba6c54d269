"""Decode attention: the C kernel over the paged cache against the matmul formula.

Times the decode-attention kernel of ``lmaas.runtimes.llm.paged.cpu_kernels`` (what the paged
runner uses for bf16 on CPUs, serving option ``cpu_kernels``) per decode step (12 layers,
batch 64, 4 KV heads x group 3, head_dim 64) over in-order and over shuffled block tables,
against the matmul path of ``paged/attention.py`` over a contiguous view, and prints the
kernel's largest error against its float32 reference. Not a test::

    .venv/bin/python benchmarks/decode_kernel.py
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from lmaas.runtimes.llm.paged.cpu_kernels import (
    CpuKernels,
    build_cpu_kernels,
    reference_attention,
)


def _step_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def _kernel_step(
    kernel: CpuKernels,
    q: torch.Tensor,
    cache: list[torch.Tensor],
    tables: torch.Tensor,
    contexts: torch.Tensor,
    context: int,
) -> None:
    for layer in cache:
        kernel.attention(q, layer, tables, contexts, context, 0.125)


def _matmul_step(
    queries: torch.Tensor, views: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor
) -> None:
    """The engine's formula (``paged/attention.py``) over contiguous keys and values."""
    for keys, values in views:
        scores = torch.matmul(queries, keys.transpose(-1, -2))
        probs = torch.add(bias, scores, alpha=0.125).softmax(-1).to(queries.dtype)
        torch.matmul(probs, values)


def main() -> None:
    kernel = build_cpu_kernels(
        head_dim=64, group=3, dtype=torch.bfloat16, device=torch.device("cpu"), mode="on"
    )
    assert kernel is not None
    bf16 = torch.bfloat16
    batch, kv_heads, group, head_dim, block_size, num_blocks, layers = 64, 4, 3, 64, 16, 2000, 12
    cache = [
        torch.randn(2, kv_heads, num_blocks, block_size, head_dim).to(bf16) for _ in range(layers)
    ]
    q = torch.randn(batch, kv_heads * group, head_dim).to(bf16)
    for context in (144, 208, 256):
        blocks = -(-context // block_size)
        contexts = torch.full((batch,), context, dtype=torch.long)
        row = [f"context {context}:"]
        for name, order in (
            ("shuffled", torch.randperm(num_blocks)),
            ("in order", torch.arange(num_blocks)),
        ):
            tables = order[: batch * blocks].view(batch, blocks).contiguous()
            got = kernel.attention(q, cache[0], tables, contexts, context, 0.125).float()
            want = reference_attention(q, cache[0], tables, contexts, 0.125).float()
            error = float((got - want).abs().max())

            run = functools.partial(_kernel_step, kernel, q, cache, tables, contexts, context)
            row.append(f"kernel {name} {_step_ms(run):.2f} ms (max error {error:.4f})")
        views = [
            (torch.randn(kv_heads, batch, context, head_dim).to(bf16),) * 2 for _ in range(layers)
        ]
        queries = q.view(batch, kv_heads, group, head_dim).transpose(0, 1)
        matmuls = functools.partial(_matmul_step, queries, views, torch.zeros(batch, 1, context))
        row.append(f"matmul over a contiguous view {_step_ms(matmuls):.2f} ms")
        print(" | ".join(row))


if __name__ == "__main__":
    main()
