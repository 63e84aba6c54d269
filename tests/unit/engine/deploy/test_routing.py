"""Weighted choice between versions, per-version outcome windows and the canary guard."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
from collections import Counter

import pytest

from lmaas.engine.routing import (
    CanaryGuard,
    GuardConfig,
    OutcomeWindow,
    SmoothWeightedRoundRobin,
    WindowCounts,
    WindowSummary,
    bucket_bound,
    latency_bucket,
    note_routed,
    percentile,
    track_routed,
)


def test_a_ten_percent_canary_gets_ten_percent_of_2000_requests() -> None:
    router = SmoothWeightedRoundRobin([("1", 90), ("2", 10)])
    picks = Counter(router.pick() for _ in range(2000))
    assert picks == {"1": 1800, "2": 200}


@pytest.mark.parametrize("weights", [[("a", 1), ("b", 2), ("c", 97)], [("a", 33), ("b", 67)]])
def test_every_window_of_100_picks_follows_the_weights(weights: list[tuple[str, int]]) -> None:
    router = SmoothWeightedRoundRobin(weights)
    picks = [router.pick() for _ in range(1000)]
    for start in range(0, 1000, 100):
        assert Counter(picks[start : start + 100]) == dict(weights)


def test_turns_are_spread_not_bunched() -> None:
    router = SmoothWeightedRoundRobin([("1", 90), ("2", 10)])
    picks = [router.pick() for _ in range(100)]
    gaps = [i for i, p in enumerate(picks) if p == "2"]
    assert all(b - a == 10 for a, b in itertools.pairwise(gaps))


def test_unavailable_versions_give_their_share_to_the_others() -> None:
    router = SmoothWeightedRoundRobin([("1", 90), ("2", 10), ("zero", 0)])
    assert router.keys == ["1", "2"]
    assert {router.pick({"1"}) for _ in range(50)} == {"1"}
    assert router.pick(set()) is None
    assert router.pick({"zero"}) is None
    # Once it is back, the canary gets its share again.
    picks = Counter(router.pick({"1", "2"}) for _ in range(1000))
    assert 90 <= picks["2"] <= 110


def test_random_weights_always_sum_exactly() -> None:
    rng = random.Random(7)
    for _ in range(50):
        a = rng.randint(1, 99)
        router = SmoothWeightedRoundRobin([("x", a), ("y", 100 - a)])
        picks = Counter(router.pick() for _ in range(300))
        assert picks["x"] == 3 * a


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.99) is None
    assert percentile([1.0], 0.99) == 1.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.5) == 50.0


def test_outcome_window_forgets_old_samples() -> None:
    window = OutcomeWindow(window_s=10.0)
    for t in range(20):
        window.record(float(t), ok=t % 4 != 0, latency_s=0.1 * t)
    summary = window.summary(now=19.0)
    assert summary.requests == 11  # t = 9 .. 19
    assert summary.errors == 2  # t = 12 and 16
    assert summary.p99_s == pytest.approx(1.9)
    window.clear()
    assert window.summary(19.0) == WindowSummary(0, 0, None)


def _summary(requests: int, errors: int, p99: float | None) -> WindowSummary:
    return WindowSummary(requests, errors, p99)


def test_guard_rolls_back_on_error_rate() -> None:
    guard = CanaryGuard(GuardConfig(error_factor=2.0, min_error_rate=0.05, min_requests=20))
    healthy = _summary(200, 2, 0.01)  # 1%
    assert guard.verdict(healthy, _summary(19, 19, None)) is None  # too few to judge
    assert guard.verdict(healthy, _summary(20, 1, 0.01)) is None  # 5%: not above the floor
    reason = guard.verdict(healthy, _summary(20, 2, 0.01))  # 10% > max(2%, 5%)
    assert reason is not None and "error rate 10.0%" in reason
    noisy_stable = _summary(200, 20, 0.01)  # 10%
    assert guard.verdict(noisy_stable, _summary(40, 8, 0.01)) is None  # 20% is not > 20%
    assert guard.verdict(noisy_stable, _summary(40, 9, 0.01)) is not None


def test_guard_rolls_back_on_p99_latency() -> None:
    guard = CanaryGuard(GuardConfig(latency_factor=3.0, min_requests=20))
    stable = _summary(100, 0, 0.010)
    assert guard.verdict(stable, _summary(30, 0, 0.029)) is None
    reason = guard.verdict(stable, _summary(30, 0, 0.031))
    assert reason is not None and "p99 latency 31.0 ms" in reason
    # No judgement on latency while the stable version has too few requests.
    assert guard.verdict(_summary(5, 0, 0.001), _summary(30, 0, 1.0)) is None


def test_the_routed_version_is_seen_by_the_request_that_tracks_it() -> None:
    note_routed("9")  # outside a tracked request: no effect, no error

    async def request(version: str) -> str | None:
        note = track_routed()
        await asyncio.sleep(0)
        await asyncio.create_task(_route(version))  # a child task shares the note
        return note.version

    async def _route(version: str) -> None:
        note_routed(version)

    async def main() -> list[str | None]:
        return list(await asyncio.gather(request("1"), request("2")))

    assert contextvars.copy_context().run(asyncio.run, main()) == ["1", "2"]


def test_window_counts_add_up_and_their_p99_is_within_five_percent() -> None:
    rng = random.Random(0)
    latencies = [rng.lognormvariate(-3, 1) for _ in range(3000)]
    windows = []
    for part in range(3):  # three gateways, a third of the traffic each
        window = OutcomeWindow(60)
        for latency in latencies[part::3]:
            window.record(0.0, True, latency)
        window.record(0.0, False, 9.0)  # an error: counted, not in the latencies
        windows.append(window.counts(0.0))
    pooled = WindowCounts.pooled(windows)
    exact = percentile(sorted(latencies), 0.99)
    summary = pooled.summary()
    assert (summary.requests, summary.errors) == (3003, 3)
    assert exact is not None and summary.p99_s is not None
    assert exact <= summary.p99_s <= exact * 1.05
    assert WindowCounts.from_dict(pooled.to_dict()) == pooled
    assert WindowCounts().summary() == WindowSummary(0, 0, None)
    for latency in (0.0, 1e-4, 0.0123, 1.0, 59.9):
        bucket = latency_bucket(latency)
        assert latency <= bucket_bound(bucket) and (
            bucket == 0 or latency > bucket_bound(bucket - 1)
        )
