"""The dynamic batcher: when a batch is due, what goes in it, and the bounded queue."""

from __future__ import annotations

import random

import pytest

from lmaas.core.errors import OverloadedError
from lmaas.engine.scheduling import BatcherConfig, DynamicBatcher, QueuedRow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rows(request_id: str, *lengths: int) -> list[QueuedRow[str]]:
    return [QueuedRow(request_id, i, n, f"{request_id}/{i}") for i, n in enumerate(lengths)]


def make(**kw: float) -> tuple[DynamicBatcher[str], Clock]:
    clock = Clock()
    config = BatcherConfig(**{"max_batch_size": 4, "max_wait_s": 0.01, **kw})  # type: ignore[arg-type]
    return DynamicBatcher(config, clock), clock


def test_waits_for_a_full_batch_or_the_deadline() -> None:
    batcher, clock = make()
    assert batcher.wait_s() is None and batcher.next_batch() == []
    batcher.put(rows("a", 5))
    assert batcher.wait_s() == pytest.approx(0.01)
    assert batcher.next_batch() == []
    clock.now += 0.01
    assert [r.payload for r in batcher.next_batch()] == ["a/0"]
    batcher.put(rows("b", 5, 5, 5))
    batcher.put(rows("c", 5))
    assert batcher.wait_s() == 0.0  # four rows: full
    assert len(batcher.next_batch()) == 4
    assert len(batcher) == 0


def test_force_takes_whatever_waits() -> None:
    batcher, _ = make()
    batcher.put(rows("a", 3, 9))
    assert len(batcher.next_batch(force=True)) == 2


def test_groups_by_length_and_always_takes_the_oldest() -> None:
    batcher, clock = make(max_batch_size=3)
    batcher.put(rows("old", 50))
    batcher.put(rows("x", 2, 3, 48, 52, 4, 49))
    clock.now += 1
    first = batcher.next_batch()
    assert first[0].request_id == "old"
    assert sorted(r.length for r in first) == [48, 49, 50]
    second = batcher.next_batch()
    assert sorted(r.length for r in second) == [2, 3, 4]
    assert [r.length for r in batcher.next_batch()] == [52]


def test_token_budget_caps_padded_cost() -> None:
    batcher, clock = make(max_batch_size=8, max_batch_tokens=100)
    batcher.put(rows("a", 30, 30, 30, 30, 30))
    assert batcher.wait_s() == 0.0  # 5 x 30 = 150 >= 100: due now
    batch = batcher.next_batch()
    assert len(batch) == 3  # 3 x 30 = 90; a fourth row would make 120
    clock.now += 1
    assert len(batcher.next_batch()) == 2


def test_a_row_longer_than_the_budget_still_runs_alone() -> None:
    batcher, clock = make(max_batch_tokens=10)
    batcher.put(rows("a", 50, 1))
    clock.now += 1
    assert [r.length for r in batcher.next_batch()] == [50]
    assert [r.length for r in batcher.next_batch()] == [1]


def test_bounded_queue_refuses_a_whole_request() -> None:
    batcher, _ = make(max_queue_rows=3)
    batcher.put(rows("a", 1, 1))
    with pytest.raises(OverloadedError) as info:
        batcher.put(rows("b", 1, 1))
    assert info.value.retry_after_s == 1.0
    assert len(batcher) == 2  # nothing of b was queued
    batcher.put(rows("c", 1))


def test_remove_drops_every_row_of_a_request() -> None:
    batcher, clock = make()
    batcher.put(rows("a", 4, 8))
    batcher.put(rows("b", 6))
    assert batcher.remove("a") == 2
    assert batcher.remove("zzz") == 0
    clock.now += 1
    assert [r.request_id for r in batcher.next_batch()] == ["b"]


def test_every_row_comes_out_exactly_once() -> None:
    rng = random.Random(0)
    batcher, clock = make(max_batch_size=5, max_batch_tokens=200)
    expected = set()
    for i in range(60):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 4))]
        batcher.put(rows(f"r{i}", *lengths))
        expected.update((f"r{i}", j) for j in range(len(lengths)))
    clock.now += 1
    seen = []
    while batch := batcher.next_batch():
        assert len(batch) <= 5
        assert len(batch) == 1 or len(batch) * max(r.length for r in batch) <= 200
        seen.extend((r.request_id, r.index) for r in batch)
    assert sorted(seen) == sorted(expected) and len(batcher) == 0


def test_config_is_checked() -> None:
    for bad in ({"max_batch_size": 0}, {"max_wait_s": -1}, {"max_batch_tokens": 0}):
        with pytest.raises(ValueError):
            BatcherConfig(**bad)  # type: ignore[arg-type]
