"""Op-level profile of the paged runner: one decode step at batch 64 and one prefill chunk.

Builds the ~125M bench Llama (random weights, bf16 where the CPU has avx512_bf16), then runs
``torch.profiler`` over ``--steps`` successive decode steps (batch 64, context ~133, the decode
view appending as in the engine's steady state) and over one prefill chunk of 16 x 128 tokens
(the engine's default token budget of 2048), and prints the ops by self CPU time. Not a test::

    .venv/bin/python benchmarks/step_profile.py [--steps 5] [--rows 25] [--compile on|off]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from runner_step import (  # a sibling script
    BLOCK_SIZE,
    CONTEXT,
    _ArgmaxSampler,
    decode_steps,
    prefill_batch,
    runner_block_bytes,
)
from torch.profiler import ProfilerActivity, profile

from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.llm.paged import PagedModelRunner
from lmaas.runtimes.llm.paged.decode_view import DEFAULT_VIEW_BYTES
from lmaas.testing.tiny_models import build_bench_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefill-seqs", type=int, default=16)
    parser.add_argument("--compile", default="off", help="serving option compile: auto|on|off")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: all); 1 keeps a shared box's "
        "stalled OpenMP barriers out of the per-op times",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_bench_llama(Path(tmp) / "bench-llama")
        spec = WorkerSpec(
            model_name="bench", model_version="1", task="chat", format="safetensors",
            model_dir=str(model_dir), files=[], requests_endpoint="", results_endpoint="",
            device="cpu", options={"compile": args.compile},
        )  # fmt: skip
        runner = PagedModelRunner(spec, sampler=_ArgmaxSampler())
        runner.load()
        runner.allocate_kv_cache(1400 * runner_block_bytes(runner) + DEFAULT_VIEW_BYTES, BLOCK_SIZE)
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"threads {torch.get_num_threads()}, dtype {runner.dtype}, block {BLOCK_SIZE}")
        step = decode_steps(runner, args.batch, CONTEXT)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(f"\n== {args.steps} decode steps, batch {args.batch}, context ~{CONTEXT}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        prefill = prefill_batch(args.prefill_seqs, 128)
        runner.compute_logits(prefill)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.compute_logits(prefill)
        print(f"\n== one prefill chunk, {args.prefill_seqs} x 128 fresh tokens")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
