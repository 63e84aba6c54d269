"""Micro-benchmark of :class:`lmaas.runtimes.llm.sampler.Sampler`: µs per step at batch 64.

Not a test. Run::

    .venv/bin/python benchmarks/sampler_step.py [--batch 64] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmaas.runtimes.llm.batch import SamplingConfig, SeqSlot
from lmaas.runtimes.llm.sampler import Sampler

CONFIGS: dict[str, SamplingConfig] = {
    "greedy": SamplingConfig(temperature=0.0),
    "temperature 0.8": SamplingConfig(temperature=0.8),
    "temperature 0.8 + top_p 0.95": SamplingConfig(temperature=0.8, top_p=0.95),
    "top_p 0.9 seeded": SamplingConfig(temperature=1.0, top_p=0.9, seed=7),
    "top_k 50 + top_p 0.9": SamplingConfig(temperature=1.0, top_k=50, top_p=0.9),
    "min_p 0.05": SamplingConfig(temperature=1.0, min_p=0.05),
    "penalties (rep 1.1, pres 0.5, freq 0.5)": SamplingConfig(
        temperature=1.0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5
    ),
    "logprobs 5": SamplingConfig(temperature=1.0, num_logprobs=5),
}


def _slots(config: SamplingConfig, batch: int, vocab: int) -> list[SeqSlot]:
    rng = torch.Generator().manual_seed(0)
    slots = []
    for i in range(batch):
        history = torch.randint(0, vocab, (256,), generator=rng).tolist()
        slots.append(
            SeqSlot(i, [history[-1]], 255, [0], True, config, history, num_prompt_tokens=128)
        )
    return slots


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scale", type=float, default=3.0, help="logit std (peakedness)")
    args = parser.parse_args()
    sampler = Sampler(torch.device("cpu"))
    base = torch.randn(args.batch, args.vocab) * args.scale
    print(f"batch {args.batch}, vocab {args.vocab}, torch threads {torch.get_num_threads()}")
    for name, config in CONFIGS.items():
        slots = _slots(config, args.batch, args.vocab)
        timings = []
        for _ in range(args.steps):
            logits = base.clone()
            start = time.perf_counter()
            sampler.sample(logits, slots)
            timings.append(time.perf_counter() - start)
        timings.sort()
        median, best = timings[len(timings) // 2], timings[0]
        print(f"{name:45s} median {median * 1e6:8.0f} µs   best {best * 1e6:8.0f} µs")


if __name__ == "__main__":
    main()
