"""Traffic routing between the versions of a deployment, and what the gateway measures per
version to guard a canary. Plain Python: the local engine drives it, tests drive it with fakes.

* :class:`SmoothWeightedRoundRobin` picks a version per request (nginx's smooth weighted round
  robin: deterministic, and over any 100 consecutive requests a version of weight 10 gets
  exactly 10, so a 10% canary gets 10 ± 0% of 2,000 requests, not 10 ± 1.3% as random would).
* :class:`OutcomeWindow` keeps the outcome and latency of each request of one version over a
  sliding time window; :class:`CanaryGuard` compares the canary's error rate and p99 latency
  with the stable version's and says when to roll back. :class:`WindowCounts` is a window as
  counts that add up across gateways (latencies in 5% log buckets), for a guard that judges the
  traffic of every gateway together.
* :func:`note_routed` / :func:`track_routed`: the API reads which version served a request
  (the ``x-lmaas-model-version`` header) through a context variable set around the request.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------- weighted choice


class SmoothWeightedRoundRobin:
    """Pick among keys in proportion to integer weights, spreading each key's turns evenly.

    Every pick adds each key's weight to its running score, takes the key with the highest
    score and subtracts the total weight from it. Keys with weight 0 are never picked.
    """

    def __init__(self, weights: Sequence[tuple[str, int]]) -> None:
        self._weights = [(k, w) for k, w in weights if w > 0]
        self._total = sum(w for _, w in self._weights)
        self._current = dict.fromkeys((k for k, _ in self._weights), 0)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self._weights]

    def pick(self, allowed: set[str] | None = None) -> str | None:
        """The next key; with ``allowed``, only those keys take part (their weights
        renormalised), e.g. the versions that have a ready replica. None when none can."""
        weights = self._weights
        if allowed is not None:
            weights = [(k, w) for k, w in weights if k in allowed]
        if not weights:
            return None
        total = sum(w for _, w in weights)
        best, best_score = weights[0][0], -math.inf
        for key, weight in weights:
            self._current[key] += weight
            if self._current[key] > best_score:
                best, best_score = key, self._current[key]
        self._current[best] -= total
        return best


# ---------------------------------------------------------------------- outcomes


@dataclass(slots=True, frozen=True)
class WindowSummary:
    """The outcomes of one version in the window."""

    requests: int
    errors: int
    p99_s: float | None
    """99th percentile latency of the successful requests (None without any)."""

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p99_s": self.p99_s,
        }


class OutcomeWindow:
    """Outcomes (time, ok, latency) of one version's requests over the last ``window_s``.

    Args:
        window_s: How far back :meth:`summary` looks.
        max_samples: Memory bound: the oldest samples go first past it.
    """

    def __init__(self, window_s: float, max_samples: int = 50_000) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, bool, float]] = deque(maxlen=max_samples)

    def record(self, now: float, ok: bool, latency_s: float) -> None:
        self._samples.append((now, ok, latency_s))

    def clear(self) -> None:
        self._samples.clear()

    def summary(self, now: float) -> WindowSummary:
        self._expire(now)
        errors = sum(1 for _, ok, _ in self._samples if not ok)
        latencies = sorted(lat for _, ok, lat in self._samples if ok)
        return WindowSummary(len(self._samples), errors, percentile(latencies, 0.99))

    def counts(self, now: float) -> WindowCounts:
        """The window as counts that add up with other gateways' (:class:`WindowCounts`)."""
        self._expire(now)
        errors = 0
        buckets: dict[int, int] = {}
        for _, ok, latency in self._samples:
            if ok:
                bucket = latency_bucket(latency)
                buckets[bucket] = buckets.get(bucket, 0) + 1
            else:
                errors += 1
        return WindowCounts(len(self._samples), errors, buckets)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()


LATENCY_BASE_S = 1e-4
"""Upper bound of latency bucket 0; bucket i ends at ``LATENCY_BASE_S * LATENCY_GROWTH ** i``."""
LATENCY_GROWTH = 1.05
"""Ratio between consecutive bucket bounds: a pooled p99 is at most 5% above the exact one."""


def latency_bucket(latency_s: float) -> int:
    """The bucket of a latency: the smallest i with ``latency_s <= bucket_bound(i)``."""
    if latency_s <= LATENCY_BASE_S:
        return 0
    i = math.ceil(math.log(latency_s / LATENCY_BASE_S) / math.log(LATENCY_GROWTH))
    return i + 1 if latency_s > bucket_bound(i) else i  # floating point at the edges


def bucket_bound(bucket: int) -> float:
    return float(LATENCY_BASE_S * LATENCY_GROWTH**bucket)


@dataclass(slots=True, frozen=True)
class WindowCounts:
    """One version's window as counts: several gateways' windows add up (``+``).

    Attributes:
        requests: Requests that counted (successes and the version's own errors).
        errors: The version's own errors among them.
        latencies: Successful requests per latency bucket (:func:`latency_bucket`).
    """

    requests: int = 0
    errors: int = 0
    latencies: Mapping[int, int] = field(default_factory=dict)

    def __add__(self, other: WindowCounts) -> WindowCounts:
        buckets = dict(self.latencies)
        for bucket, count in other.latencies.items():
            buckets[bucket] = buckets.get(bucket, 0) + count
        return WindowCounts(self.requests + other.requests, self.errors + other.errors, buckets)

    def summary(self) -> WindowSummary:
        """Requests, errors and p99 (the upper bound of the bucket holding the nearest-rank
        99th percentile: at most 5% above the exact value)."""
        total = sum(self.latencies.values())
        if total == 0:
            return WindowSummary(self.requests, self.errors, None)
        rank, seen = max(1, math.ceil(0.99 * total)), 0
        for bucket in sorted(self.latencies):
            seen += self.latencies[bucket]
            if seen >= rank:
                return WindowSummary(self.requests, self.errors, bucket_bound(bucket))
        raise AssertionError("unreachable")

    def to_dict(self) -> dict[str, Any]:
        latencies = {str(b): n for b, n in sorted(self.latencies.items())}
        return {"requests": self.requests, "errors": self.errors, "latencies": latencies}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowCounts:
        latencies = {int(b): int(n) for b, n in dict(data.get("latencies") or {}).items()}
        return cls(int(data["requests"]), int(data["errors"]), latencies)

    @staticmethod
    def pooled(windows: Iterable[WindowCounts]) -> WindowCounts:
        total = WindowCounts()
        for window in windows:
            total = total + window
        return total


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(slots=True, frozen=True)
class GuardConfig:
    """When a canary is rolled back automatically.

    Attributes:
        error_factor: Roll back when the canary's error rate exceeds the stable's times this...
        min_error_rate: ...and is above this floor (a stable version with no errors would
            otherwise make one canary error fatal).
        latency_factor: Roll back when the canary's p99 latency exceeds the stable's times this.
        min_requests: Judge only once each version has this many requests in the window.
    """

    error_factor: float = 2.0
    min_error_rate: float = 0.05
    latency_factor: float = 3.0
    min_requests: int = 20


class CanaryGuard:
    """Decides from the two windows whether the canary must be rolled back."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config

    def verdict(self, stable: WindowSummary, canary: WindowSummary) -> str | None:
        """The reason to roll back, or None while the canary holds (or too few requests)."""
        c = self.config
        if canary.requests < c.min_requests:
            return None
        limit = max(stable.error_rate * c.error_factor, c.min_error_rate)
        if canary.error_rate > limit:
            return (
                f"canary error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}) "
                f"exceeds {limit:.1%} (stable {stable.error_rate:.1%} x {c.error_factor:g}, "
                f"floor {c.min_error_rate:.0%})"
            )
        if stable.requests < c.min_requests or stable.p99_s is None or canary.p99_s is None:
            return None
        if canary.p99_s > stable.p99_s * c.latency_factor:
            return (
                f"canary p99 latency {canary.p99_s * 1000:.1f} ms exceeds stable "
                f"{stable.p99_s * 1000:.1f} ms x {c.latency_factor:g}"
            )
        return None


# ---------------------------------------------------------------------- served version


class RoutedVersion:
    """Filled by the engine with the version that served the current request."""

    __slots__ = ("version",)

    def __init__(self) -> None:
        self.version: str | None = None


_ROUTED: ContextVar[RoutedVersion | None] = ContextVar("lmaas_routed_version", default=None)


def track_routed() -> RoutedVersion:
    """Start recording, for the current request (context), which version serves it."""
    note = RoutedVersion()
    _ROUTED.set(note)
    return note


def note_routed(version: str) -> None:
    """Record the version chosen for the current request (no-op outside :func:`track_routed`)."""
    note = _ROUTED.get()
    if note is not None:
        note.version = version
