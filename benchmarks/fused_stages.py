"""Each layer stage of ``runtimes/llm/paged/fused.py``, eager against inductor-compiled.

Shapes of the ~125M bench Llama (hidden 768, 12 heads, 4 KV heads, head_dim 64, intermediate
2048); ``--tokens`` rows (64: a batch-64 decode step; 2048: a prefill chunk), decode softmax
over a context of 208. Prints CPU microseconds per call (the fastest decile: CPU time, so a
shared machine's neighbours do not count), and a compiled call's own overhead. Not a test::

    .venv/bin/python benchmarks/fused_stages.py [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from lmaas.runtimes.llm.paged import fused


def cpu_us(fn: Callable[[], object], calls: int = 200) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    times.sort()
    return times[calls // 10] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype, tokens, context = torch.bfloat16, args.tokens, 208
    compiled = fused.compiled_kernels()
    seconds = fused.warm_up(
        compiled,
        hidden_size=768,
        intermediate_size=2048,
        heads=12,
        kv_heads=4,
        head_dim=64,
        qk_norm=False,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    print(f"threads {args.threads}, tokens {tokens}; compile + warm-up {seconds:.1f} s")
    hidden = torch.randn(tokens, 768, dtype=dtype)
    weight = torch.randn(768, dtype=dtype)
    qkv = torch.randn(tokens, 20, 64, dtype=dtype)
    cos, sin = torch.randn(tokens, 1, 64, dtype=dtype), torch.randn(tokens, 1, 64, dtype=dtype)
    stages: list[tuple[str, tuple[object, ...]]] = [
        ("rms_norm", (hidden, weight, 1e-6)),
        ("add_rms_norm", (hidden, torch.randn_like(hidden), weight, 1e-6)),
        ("rotary", (qkv, cos, sin, None, 12, 4, 1e-6)),
        ("silu_mul", (torch.randn(tokens, 4096, dtype=dtype),)),
    ]
    if tokens <= 256:  # a decode batch
        bias = torch.zeros(tokens, 1, context)
        scores = torch.randn(4, tokens, 3, context, dtype=dtype)
        stages.append(("decode_softmax", (scores, bias, 0.125)))
    with torch.inference_mode():
        for name, stage_args in stages:
            eager, fast = getattr(fused.EAGER, name), getattr(compiled, name)
            eager_us = cpu_us(functools.partial(eager, *stage_args))
            compiled_us = cpu_us(functools.partial(fast, *stage_args))
            print(f"{name:<15} eager {eager_us:9.1f} us   compiled {compiled_us:9.1f} us")
        tiny = torch.randn(4)
        add_one = torch.compile(lambda x: x + 1, dynamic=None)
        add_one(tiny)
        overhead = cpu_us(lambda: add_one(tiny)) - cpu_us(lambda: tiny + 1)
        print(f"a compiled call's own overhead: {overhead:.1f} us")


if __name__ == "__main__":
    main()
