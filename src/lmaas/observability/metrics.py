"""Prometheus metrics of one gateway process, in a registry the caller owns (no globals, H5)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from functools import partial

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lmaas.core.types import ModelState

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 30.0)


class Metrics:
    """The gateway's metrics, registered in their own :class:`CollectorRegistry`.

    Args:
        namespace: Prefix of every metric name (``lmaas_http_requests_total``...).
    """

    def __init__(self, namespace: str = "lmaas") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter = partial(Counter, namespace=namespace, registry=self.registry)
        histogram = partial(Histogram, namespace=namespace, registry=self.registry)
        gauge = partial(Gauge, namespace=namespace, registry=self.registry)
        self.http_requests = counter(
            "http_requests_total",
            "HTTP requests by route template, model and status code.",
            ["route", "model", "status"],
        )
        self.http_duration = histogram(
            "http_request_duration_seconds",
            "Time from request start to the end of the response, streams included.",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Time from request start to the first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS_S,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.", ["model"])
        self.generation_tokens = counter("generation_tokens", "Tokens generated.", ["model"])
        self.worker_state = gauge(
            "worker_state",
            "1 for the current state of each model's worker, 0 for the others.",
            ["model", "state"],
        )
        self.in_flight = gauge("requests_in_flight", "Inference requests being served.", ["model"])
        self.engine_stat = gauge(
            "engine_stat",
            "Engine counters from worker heartbeats, summed over the model's ready workers: "
            "running, waiting, kv_free_blocks, kv_total_blocks, preemptions, "
            "prefix_cache_hit_tokens...",
            ["model", "stat"],
        )
        self.version_engine_stat = gauge(
            "version_engine_stat",
            "lmaas_engine_stat per deployed version (summed over its ready workers).",
            ["model", "version", "stat"],
        )
        self.replicas = gauge(
            "replicas",
            "Worker processes of each deployed version by state (draining: leaving the "
            "deployment, finishing its requests).",
            ["model", "version", "state"],
        )
        self._series: dict[str, set[tuple[Gauge, tuple[str, ...]]]] = {}
        """Per model, the (gauge, labels) series the engine's reports set, to drop stale ones."""

    def observe_http(self, route: str, model: str, status: int, duration_s: float) -> None:
        """Count one finished HTTP request and record its latency."""
        self.http_requests.labels(route, model, str(status)).inc()
        self.http_duration.labels(route).observe(duration_s)

    def observe_ttft(self, model: str, seconds: float) -> None:
        """Record the time to the first token of one generation."""
        self.ttft.labels(model).observe(seconds)

    def add_tokens(self, model: str, *, prompt_tokens: int = 0, generation_tokens: int = 0) -> None:
        """Count prompt and generated tokens of one request (or one part of it)."""
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(model).inc(generation_tokens)

    def set_engine_stats(self, model: str, stats: Mapping[str, int]) -> None:
        """Publish a model's engine counters (the engine sums its workers' heartbeats)."""
        for name, value in stats.items():
            self._set(model, self.engine_stat, (model, name), value)

    def set_versions(
        self,
        model: str,
        replicas: Mapping[str, Mapping[str, int]],
        stats: Mapping[str, Mapping[str, int]],
    ) -> None:
        """Publish, per deployed version, its worker count by state and its engine counters;
        series of versions (or states) no longer reported are dropped."""
        keep: set[tuple[Gauge, tuple[str, ...]]] = set()
        for version, states in replicas.items():
            for state, count in states.items():
                keep.add(self._set(model, self.replicas, (model, version, state), count))
        for version, counters in stats.items():
            for stat, value in counters.items():
                keep.add(self._set(model, self.version_engine_stat, (model, version, stat), value))
        per_version = (self.replicas, self.version_engine_stat)
        self._drop(model, lambda s: s[0] in per_version and s not in keep)

    def forget_model(self, model: str) -> None:
        """A model no longer served: drop its engine and version series (``worker_state``
        stays, one-hot on ``stopped``)."""
        self._drop(model, lambda _series: True)
        self.set_worker_state(model, ModelState.STOPPED)

    def _set(
        self, model: str, gauge: Gauge, labels: tuple[str, ...], value: float
    ) -> tuple[Gauge, tuple[str, ...]]:
        gauge.labels(*labels).set(value)
        series = (gauge, labels)
        self._series.setdefault(model, set()).add(series)
        return series

    def _drop(self, model: str, which: Callable[[tuple[Gauge, tuple[str, ...]]], bool]) -> None:
        known = self._series.get(model, set())
        for series in [s for s in known if which(s)]:
            gauge, labels = series
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
            known.discard(series)

    def set_worker_state(self, model: str, state: ModelState | str) -> None:
        """Mark ``state`` as the current state of ``model``'s worker (one-hot over states)."""
        current = str(state)
        for known in ModelState:
            self.worker_state.labels(model, known.value).set(1 if known.value == current else 0)
        if current not in {s.value for s in ModelState}:
            self.worker_state.labels(model, current).set(1)

    def request_started(self, model: str) -> None:
        """One more inference request in flight for ``model``."""
        self.in_flight.labels(model).inc()

    def request_finished(self, model: str) -> None:
        """One inference request of ``model`` is done (successfully or not)."""
        self.in_flight.labels(model).dec()

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
