"""The LLM engine in-process (no HTTP): N requests of P prompt / O output tokens, step to idle.

Usage: .venv/bin/python benchmarks/engine_inprocess.py [--requests 64] [--input-len 128]
       [--output-len 128] [--device auto|cpu|cuda] [--profile]
       [--compile off,auto --rounds 3]

Builds the ~125M Llama-shaped bench model (random weights, bf16 where the CPU has avx512_bf16)
and prints output tokens/s overall and after the first token, and the process's peak RSS;
``--profile`` adds the top of a cProfile listing. Compare with ``compare_llm.py`` (over HTTP)
to see what serving costs.

``--compile`` with several comma-separated values of the ``compile`` serving option (or
``--options`` sets of ``key=value;...``) builds one engine per value in this process (each
warmed up, startup time printed) and runs them interleaved for ``--rounds`` rounds: an A/B on
a shared, noisy machine, reported as the median and range of each variant and of its ratio to
the first variant within each round. Every round draws new prompts (the same for every variant
of that round), so no round hits the prefix cache of an earlier one.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lmaas.core.messages import GenerateRequest, SamplingParams, WorkerSpec
from lmaas.testing.tiny_models import build_bench_llama
from lmaas.worker.factory import create_runner


def build_engine(model_dir: Path, args: argparse.Namespace, options: dict[str, str]) -> Any:
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
        options=options,
    )
    start = time.perf_counter()
    engine = create_runner(spec)
    engine.load()
    loaded = time.perf_counter()
    engine.warmup()
    ready = time.perf_counter()
    print(
        f"[{_label(options)}] load {loaded - start:.1f} s + warmup {ready - loaded:.1f} s "
        f"= ready in {ready - start:.1f} s"
    )
    return engine


def run_once(
    engine: Any, args: argparse.Namespace, profile: cProfile.Profile | None, seed: int = 0
) -> tuple[float, float]:
    """One workload; ``seed`` picks the prompts. A repeat on the same engine needs new prompts:
    the prefix cache keeps the last run's blocks, and a repeat would skip its prefill."""
    rng = random.Random(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.requests):
        ids = [rng.randrange(100, 30000) for _ in range(args.input_len)]
        params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        engine.add_request(GenerateRequest(f"r{i}", params, prompt_token_ids=ids))
    if profile is not None:
        profile.enable()
    num_tokens, first = 0, 0.0
    while engine.has_work():
        deltas = engine.step()
        num_tokens += sum(d.num_new_tokens for d in deltas)
        if deltas and not first:
            first = time.perf_counter() - start
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if profile is not None:
        profile.disable()
    print(
        f"{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.0f} tok/s overall, "
        f"{num_tokens / (elapsed - first):.0f} tok/s after the first token at {first:.2f} s; "
        f"CPU {cpu:.1f} s = {num_tokens / cpu:.0f} tok per CPU-second"
    )
    return num_tokens / elapsed, num_tokens / cpu


def _label(options: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in options.items()) or "default"


def _parse_options(raw: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in raw.split(";") if item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", default="", help="A/B: comma-separated compile option values")
    parser.add_argument("--options", action="append", default=[], help="A/B: k=v;k=v per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-bytes", type=int, default=0, help="0: the engine default")
    args = parser.parse_args()
    model_dir = build_bench_llama(Path(tempfile.mkdtemp(prefix="lmaas-bench-")) / "bench-llama")
    variants = [_parse_options(raw) for raw in args.options]
    variants += [{"compile": mode} for mode in args.compile.split(",") if mode]
    if args.kv_cache_bytes:
        for options in variants or [{}]:
            options["kv_cache_bytes"] = str(args.kv_cache_bytes)
    if len(variants) < 2:
        engine = build_engine(model_dir, args, variants[0] if variants else {})
        profile = cProfile.Profile() if args.profile else None
        run_once(engine, args, profile)
        _print_rss()
        if profile is not None:
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        return
    engines = [build_engine(model_dir, args, options) for options in variants]
    results: list[list[float]] = [[] for _ in variants]
    per_cpu: list[list[float]] = [[] for _ in variants]
    for round_index in range(args.rounds):
        order = list(range(len(variants)))
        if round_index % 2:
            order.reverse()  # alternate who runs first within a round
        for i in order:
            print(f"round {round_index + 1} [{_label(variants[i])}] ", end="")
            rate, rate_cpu = run_once(engines[i], args, None, seed=round_index)
            results[i].append(rate)
            per_cpu[i].append(rate_cpu)
    for title, table in (("tok/s overall", results), ("tok per CPU-second", per_cpu)):
        print(f"\nmedian of {args.rounds} interleaved rounds ({title}), ratio to the first:")
        for options, rates in zip(variants, table, strict=True):
            ratios = [r / b for r, b in zip(rates, table[0], strict=True)]
            print(
                f"  {_label(options):<40} {statistics.median(rates):6.0f} "
                f"[{min(rates):.0f}-{max(rates):.0f}]  ratio {statistics.median(ratios):.3f} "
                f"[{min(ratios):.3f}-{max(ratios):.3f}]"
            )
    _print_rss()


def _print_rss() -> None:
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(ln.split(":", 1) for ln in status.read_text().splitlines() if ":" in ln)
        print(f"peak RSS (VmHWM) {int(fields['VmHWM'].split()[0]) / 1024:.0f} MB")


if __name__ == "__main__":
    main()
