"""Per-request measurements and their aggregation, with the definitions of ``vllm bench serve``.

* TTFT: from just before the POST to the first SSE chunk that carries ``choices`` (its text may
  be empty).
* ITL: every gap between successive ``choices``-bearing chunks, pooled over all requests. A chunk
  may hold several tokens, so this is a *chunk* gap.
* E2EL: from the POST to the last ``choices``-bearing chunk (the usage-only chunk and ``[DONE]``
  do not count).
* TPOT: per request, ``(E2EL - TTFT) / (output_tokens - 1)``, only for requests with more than
  one output token.

Percentiles interpolate linearly between the two nearest ranks, as ``numpy.percentile`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50.0, 90.0, 99.0)
"""The percentiles every latency metric reports."""

METRICS = ("ttft", "tpot", "itl", "e2el")
"""The latency metrics, by their vLLM names."""


@dataclass(slots=True)
class RequestOutcome:
    """What one benchmark request measured (times in seconds, ``perf_counter`` based)."""

    start_s: float
    """``perf_counter()`` just before the POST."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    success: bool = False
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for one output token or fewer."""
        if self.output_tokens <= 1:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True, frozen=True)
class LatencyStats:
    """Summary of one latency metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[float, float]


@dataclass(slots=True, frozen=True)
class Aggregate:
    """The run-level numbers, computed from the outcomes and the wall time."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_concurrent_requests: int
    latency: dict[str, LatencyStats]
    errors: list[str]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(
    values_s: Sequence[float], percentiles: Sequence[float] = PERCENTILES
) -> LatencyStats:
    """Mean, median, population std and percentiles of ``values_s``, converted to ms."""
    values = [v * 1000.0 for v in values_s]
    if not values:
        return LatencyStats(0.0, 0.0, 0.0, {p: 0.0 for p in percentiles})
    mean = sum(values) / len(values)
    # numpy's std (ddof=0), which vLLM reports.
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return LatencyStats(
        mean_ms=mean,
        median_ms=percentile(values, 50.0),
        std_ms=std,
        percentiles_ms={p: percentile(values, p) for p in percentiles},
    )


def peak_concurrency(outcomes: Sequence[RequestOutcome]) -> int:
    """Most requests in flight at once (a sweep over start and end times)."""
    events: list[tuple[float, int]] = []
    for out in outcomes:
        events.append((out.start_s, 1))
        # An end sorts before a start at the same instant: they did not overlap.
        events.append((out.start_s + max(out.latency_s, 0.0), -1))
    events.sort(key=lambda event: (event[0], event[1]))
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def aggregate(
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    percentiles: Sequence[float] = PERCENTILES,
) -> Aggregate:
    """Aggregate the outcomes of a run that took ``duration_s`` of wall time."""
    done = [out for out in outcomes if out.success]
    tpots = [t for t in (out.tpot_s for out in done) if t is not None]
    series = {
        "ttft": [out.ttft_s for out in done],
        "tpot": tpots,
        "itl": [gap for out in done for gap in out.itl_s],
        "e2el": [out.latency_s for out in done],
    }
    total_in = sum(out.prompt_tokens for out in done)
    total_out = sum(out.output_tokens for out in done)
    safe_duration = duration_s if duration_s > 0 else math.inf
    errors = [out.error for out in outcomes if not out.success and out.error]
    return Aggregate(
        duration_s=duration_s,
        completed=len(done),
        failed=len(outcomes) - len(done),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(done) / safe_duration,
        output_throughput=total_out / safe_duration,
        total_token_throughput=(total_in + total_out) / safe_duration,
        max_concurrent_requests=peak_concurrency(done),
        latency={name: summarize(series[name], percentiles) for name in METRICS},
        errors=errors,
    )


def percentile_key(p: float) -> str:
    """vLLM's label for a percentile: ``99`` → ``p99``, ``99.9`` → ``p99.9``."""
    return f"p{int(p)}" if int(p) == p else f"p{p}"
