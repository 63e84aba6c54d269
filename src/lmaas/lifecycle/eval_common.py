"""What every task's evaluation shares: options, scores, progress, and running a batch runner
over the examples (the worker's preprocess → forward → postprocess path, without its threads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import InferRequest, InferResult, RequestError
from lmaas.lifecycle.datasets import EvalData
from lmaas.runtimes.base import BatchRunner
from lmaas.runtimes.batching import run_batch

Progress = Callable[[int], None]
"""Called with the number of examples just finished."""


@dataclass(slots=True, frozen=True)
class EvalOptions:
    """How to evaluate (the data set is loaded already).

    Attributes:
        batch_size: Examples per ``run_batch`` call / sequences in flight.
        max_new_tokens: Generation cap for reference-based metrics.
        ks: Cut-offs of recall@k (embedding, rerank) and nDCG@k (rerank).
    """

    batch_size: int = 32
    max_new_tokens: int = 64
    ks: tuple[int, ...] = (1, 5, 10)


@dataclass(slots=True)
class TaskScores:
    """What one task evaluation found: scalar metrics plus details (per-class report...)."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def infer_all(
    runner: BatchRunner,
    requests: list[InferRequest],
    data: EvalData,
    options: EvalOptions,
    progress: Progress,
    *,
    first: int = 0,
) -> list[InferResult]:
    """Run ``requests`` (one per example, in order, the first being example ``first``) in
    chunks of ``options.batch_size``.

    Raises:
        InvalidRequestError: The model refused an example (the message names its line).
    """
    results: list[InferResult] = []
    for start in range(0, len(requests), options.batch_size):
        chunk = requests[start : start + options.batch_size]
        for offset, result in enumerate(run_batch(runner, chunk, options.batch_size)):
            if isinstance(result, RequestError):
                index = first + start + offset
                where = data.where(index) if index < len(data.rows) else "input"
                raise InvalidRequestError(f"{where}: the model refused it: {result.message}")
            results.append(result)
        progress(len(chunk))
    return results
