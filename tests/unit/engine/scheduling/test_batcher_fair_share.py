"""Weighted fair share between tenants in the dynamic batcher."""

from __future__ import annotations

import random

from lmaas.engine.scheduling import BatcherConfig, DynamicBatcher, QueuedRow


def _request(
    request_id: str, tenant: str, length: int, weight: float = 1.0
) -> list[QueuedRow[str]]:
    return [QueuedRow(request_id, 0, length, request_id, tenant=tenant, weight=weight)]


def _batcher(max_batch_size: int) -> DynamicBatcher[str]:
    config = BatcherConfig(max_batch_size=max_batch_size, max_wait_s=0.0, max_queue_rows=10_000)
    return DynamicBatcher(config)


def test_a_flooding_tenant_cannot_starve_a_late_one() -> None:
    rng = random.Random(0)
    batcher = _batcher(4)
    for i in range(100):
        batcher.put(_request(f"a{i}", "a", rng.randint(5, 50)))
    batcher.next_batch()
    late = {f"b{i}" for i in range(5)}
    for request_id in sorted(late):
        batcher.put(_request(request_id, "b", rng.randint(5, 50)))
    num_batches = 0
    while late:
        batch = batcher.next_batch()
        assert batch, "the queue ran dry before b was served"
        late -= {row.request_id for row in batch}
        num_batches += 1
    # FIFO would serve a's 96 waiting rows first (24 batches); fair share serves b at once
    assert num_batches <= 2 * 5


def test_one_tenant_alone_gets_the_oldest_row_first() -> None:
    batcher = _batcher(1)
    for i, length in enumerate([30, 5, 17, 5, 40]):
        batcher.put(_request(f"r{i}", "only", length))
    order = [batcher.next_batch()[0].request_id for _ in range(5)]
    assert order == ["r0", "r1", "r2", "r3", "r4"]


def test_weights_three_to_one_give_about_three_to_one_service() -> None:
    rng = random.Random(1)
    for max_batch_size in (1, 4):
        batcher = _batcher(max_batch_size)
        for i in range(400):
            batcher.put(_request(f"b{i}", "bronze", rng.randint(8, 12), weight=1.0))
            batcher.put(_request(f"g{i}", "gold", rng.randint(8, 12), weight=3.0))
        served = {"gold": 0, "bronze": 0}
        for _ in range(120 // max_batch_size):
            for row in batcher.next_batch():
                served["gold" if row.request_id.startswith("g") else "bronze"] += row.length
        assert 2.5 <= served["gold"] / served["bronze"] <= 3.5, (max_batch_size, served)


def test_removed_rows_leave_no_tenant_behind() -> None:
    batcher = _batcher(4)
    batcher.put(_request("x", "a", 10))
    batcher.put(_request("y", "b", 10))
    assert batcher.remove("x") == 1
    assert [row.request_id for row in batcher.next_batch()] == ["y"]
    assert len(batcher) == 0 and not batcher._service and not batcher._num_rows_by_tenant
