"""The LLM engine in-process (no HTTP): N requests of P prompt / O output tokens, step to idle.

Usage: .venv/bin/python benchmarks/engine_inprocess.py [--requests 64] [--input-len 128]
       [--output-len 128] [--device auto|cpu|cuda] [--profile]

Builds the ~125M Llama-shaped bench model (random weights, bf16 where the CPU has avx512_bf16)
and prints output tokens/s overall and after the first token, and the process's peak RSS;
``--profile`` adds the top of a cProfile listing. Compare with ``compare_llm.py`` (over HTTP)
to see what serving costs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import tempfile
import time
from pathlib import Path

from lmaas.core.messages import GenerateRequest, SamplingParams, WorkerSpec
from lmaas.testing.tiny_models import build_bench_llama
from lmaas.worker.factory import create_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    model_dir = build_bench_llama(Path(tempfile.mkdtemp(prefix="lmaas-bench-")) / "bench-llama")
    spec = WorkerSpec(
        "bench-llama",
        "1",
        "completion",
        "safetensors",
        str(model_dir),
        [],
        "",
        "",
        max_batch_size=args.requests,
        device=args.device,
    )
    engine = create_runner(spec)
    engine.load()
    engine.warmup()
    rng = random.Random(0)
    profile = cProfile.Profile()
    start = time.perf_counter()
    for i in range(args.requests):
        ids = [rng.randrange(100, 30000) for _ in range(args.input_len)]
        params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        engine.add_request(GenerateRequest(f"r{i}", params, prompt_token_ids=ids))
    if args.profile:
        profile.enable()
    num_tokens, first = 0, 0.0
    while engine.has_work():  # type: ignore[attr-defined]
        deltas = engine.step()  # type: ignore[attr-defined]
        num_tokens += sum(d.num_new_tokens for d in deltas)
        if deltas and not first:
            first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    profile.disable()
    print(
        f"{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.0f} tok/s overall, "
        f"{num_tokens / (elapsed - first):.0f} tok/s after the first token at {first:.2f} s"
    )
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(ln.split(":", 1) for ln in status.read_text().splitlines() if ":" in ln)
        print(f"peak RSS (VmHWM) {int(fields['VmHWM'].split()[0]) / 1024:.0f} MB")
    if args.profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
