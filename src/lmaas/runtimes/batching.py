"""Drive a :class:`~lmaas.runtimes.base.BatchRunner` synchronously, without the worker.

For warm-up, in-process benchmarks and unit tests: every request is prepared, all their rows are
sorted by length and run in batches of ``max_batch_size``, then each request is finished. The
worker uses its dynamic batcher and helper threads instead (``lmaas.worker.batching``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmaas.core.errors import LmaasError
from lmaas.core.messages import InferRequest, InferResult, RequestError
from lmaas.runtimes.base import BatchRunner, Prepared


def run_batch(
    runner: BatchRunner, requests: Sequence[InferRequest], max_batch_size: int = 32
) -> list[InferResult | RequestError]:
    """One result or per-request error for each request, in order."""
    prepared: list[Prepared | RequestError] = []
    for request in requests:
        try:
            prepared.append(runner.preprocess(request))
        except LmaasError as exc:
            prepared.append(RequestError(request.request_id, exc.code, exc.message, exc.param))
    ready = [p for p in prepared if isinstance(p, Prepared)]
    rows = [(p, i) for p in ready for i in range(len(p.rows))]
    rows.sort(key=lambda item: item[0].rows[item[1]][0])
    for p in ready:
        p.outputs = [None] * len(p.rows)
    size = max(1, max_batch_size)
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        outputs = runner.forward([p.rows[i][1] for p, i in chunk])
        for (p, i), output in zip(chunk, outputs, strict=True):
            p.outputs[i] = output
    results: list[InferResult | RequestError] = []
    for item in prepared:
        if isinstance(item, RequestError):
            results.append(item)
            continue
        try:
            results.append(runner.postprocess(item))
        except LmaasError as exc:
            results.append(RequestError(item.request_id, exc.code, exc.message, exc.param))
    return results
