"""The audit chain and the usage table on SQLite and on the real PostgreSQL: tampering by hand is
detected and named, concurrent appenders never fork the chain, an admin change and its audit row
commit together; usage rows are written in batches, once, and aggregate by tenant/key/model/day."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import text

from lmaas.core.errors import ConflictError, ModelNotFoundError
from lmaas.gateway.audit import AuditEntry
from lmaas.gateway.limits import Limits
from lmaas.gateway.service import GovernanceService
from lmaas.gateway.store import SqlGovernanceStore
from lmaas.gateway.usage import UsageMeter
from lmaas.gateway.usage_store import SqlUsageStore, UsageQuery, UsageRecord, usage_csv
from lmaas.registry.metadata import create_db_engine

pytestmark = pytest.mark.anyio


def _sql(url: str, statement: str) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def _changes(governance: GovernanceService) -> str:
    governance.create_tenant("search")
    key = governance.create_key("search", ["inference"], actor="cli:alice").key
    governance.set_key_limits(key.id, Limits(rpm=10))
    governance.set_tenant_limits("search", Limits(tpm=1000))
    governance.rotate_key(key.id)
    governance.revoke_key(key.id)
    return key.id


def test_every_change_is_audited_and_the_chain_verifies(governance: GovernanceService) -> None:
    key_id = _changes(governance)
    governance.delete_tenant("search")
    rows = governance.list_audit()
    assert [(r.seq, r.action, r.actor) for r in reversed(rows)] == [
        (1, "tenant.create", "system"),
        (2, "key.create", "cli:alice"),
        (3, "key.limits", "system"),
        (4, "tenant.limits", "system"),
        (5, "key.rotate", "system"),
        (6, "key.revoke", "system"),
        (7, "tenant.delete", "system"),
    ]
    assert rows[0].before is not None and rows[0].before["keys"] == [key_id]
    assert rows[0].after is None and rows[-1].before is None
    for newer, older in itertools.pairwise(rows):
        assert newer.prev_hash == older.hash
    report = governance.verify_audit()
    assert report.ok and report.rows == 7


def test_a_row_edited_by_hand_is_named(
    governance: GovernanceService, gov_database_url: str
) -> None:
    _changes(governance)
    _sql(gov_database_url, "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3")
    report = governance.verify_audit()
    assert not report.ok and report.first_broken_seq == 3 and "modified" in report.reason


def test_a_rewritten_hash_breaks_the_next_link(
    governance: GovernanceService, gov_database_url: str
) -> None:
    _changes(governance)
    forged = "ab" * 32  # as if someone recomputed row 2 after editing it
    _sql(gov_database_url, f"UPDATE audit_log SET hash = '{forged}' WHERE seq = 2")
    report = governance.verify_audit()
    assert not report.ok and report.first_broken_seq == 2


@pytest.mark.parametrize(("where", "broken"), [("seq = 2", 2), ("seq = 6", 6)])
def test_a_deleted_row_is_named(
    governance: GovernanceService, gov_database_url: str, where: str, broken: int
) -> None:
    _changes(governance)
    _sql(gov_database_url, f"DELETE FROM audit_log WHERE {where}")
    report = governance.verify_audit()
    assert not report.ok and report.first_broken_seq == broken


def test_a_failed_change_leaves_no_audit_row(governance: GovernanceService) -> None:
    governance.create_tenant("search")
    with pytest.raises(ConflictError):
        governance.create_tenant("search")
    assert [r.action for r in governance.list_audit()] == ["tenant.create"]
    assert governance.verify_audit().ok


def test_concurrent_appenders_do_not_fork_the_chain(gov_database_url: str) -> None:
    """Four stores (as four processes would: own pools) append at once on the same DB."""
    stores = [SqlGovernanceStore(gov_database_url) for _ in range(4)]
    per_writer = 15
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def writer(index: int, store: SqlGovernanceStore) -> None:
        barrier.wait()
        try:
            for n in range(per_writer):
                store.append_audit(AuditEntry(f"writer-{index}", "test.append", str(n)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, s)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        report = stores[0].verify_audit()
        assert report.ok and report.rows == len(stores) * per_writer
        seqs = [r.seq for r in stores[0].list_audit(limit=1000, newest_first=False)]
        assert seqs == list(range(1, len(stores) * per_writer + 1))
    finally:
        for store in stores:
            store.close()


# --------------------------------------------------------------------------- usage


def _record(tenant: str, key: str, model: str, at: datetime, **counts: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{tenant}-{at.timestamp()}",
        model=model,
        status=counts.pop("status", 200),
        tenant=tenant,
        key_id=key,
        at=at,
        **counts,  # type: ignore[arg-type]
    )


def test_usage_rows_aggregate_by_tenant_key_model_and_day(gov_database_url: str) -> None:
    store = SqlUsageStore(gov_database_url)
    day1 = datetime(2026, 3, 1, 10, tzinfo=UTC)
    day2 = day1 + timedelta(days=1)
    records = [
        _record("a", "k1", "chat", day1, prompt_tokens=10, completion_tokens=5),
        _record("a", "k1", "chat", day2, prompt_tokens=1, completion_tokens=2, status=503),
        _record("a", "k2", "embed", day1, embedding_tokens=7),
        _record("b", "k3", "whisper", day2, audio_seconds=2),
        _record("b", "k3", "vit", day2, images=3),
    ]
    try:
        store.insert(records)
        store.insert(records[:2])  # a retried batch: no duplicates
        assert store.count() == 5
        by_tenant = store.aggregate(UsageQuery(group_by=("tenant",)))
        assert [(r["tenant"], r["requests"], r["total_tokens"]) for r in by_tenant] == [
            ("a", 3, 25),
            ("b", 2, 0),
        ]
        assert by_tenant[0]["errors"] == 1 and by_tenant[1]["audio_seconds"] == 2.0
        assert by_tenant[1]["images"] == 3
        by_day = store.aggregate(UsageQuery(group_by=("day", "model"), tenant="a"))
        assert [(r["day"], r["model"], r["requests"]) for r in by_day] == [
            ("2026-03-01", "chat", 1),
            ("2026-03-01", "embed", 1),
            ("2026-03-02", "chat", 1),
        ]
        ranged = store.aggregate(
            UsageQuery(group_by=("key",), since=day2, until=day2 + timedelta(hours=1))
        )
        assert [(r["key"], r["requests"]) for r in ranged] == [("k1", 1), ("k3", 2)]
        total = store.aggregate(UsageQuery(group_by=()))
        assert total[0]["requests"] == 5
        lines = usage_csv(by_tenant, ["tenant"]).splitlines()
        assert lines[0].startswith("tenant,requests,prompt_tokens") and lines[1].startswith(
            "a,3,11"
        )
    finally:
        store.close()


async def test_the_meter_writes_in_batches_and_everything_on_close(gov_database_url: str) -> None:
    store = SqlUsageStore(gov_database_url)
    meter = UsageMeter(store, flush_interval_s=60.0, batch_size=10)
    await meter.start()
    now = datetime.now(UTC)
    try:
        for i in range(25):
            meter.record(_record("t", "k", "m", now + timedelta(microseconds=i)))
        assert store.count() == 0  # recording never writes on the caller's path
        for _ in range(100):
            if store.count() >= 20:
                break
            await asyncio.sleep(0.02)
        assert store.count() >= 20  # the batch size woke the flusher before the interval
        await meter.aclose()
        assert store.count() == 25 and meter.pending == 0 and meter.written == 25
    finally:
        store.close()


def _tiny_model_dir(tmp_path: Path) -> Path:
    src = tmp_path / "m"
    src.mkdir()
    config = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(src / "model.safetensors"))
    return src


class _SlowStore(SqlUsageStore):
    """A usage table whose writes wait for a signal (the fsync of a busy disk)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.started, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def insert(self, records: Sequence[UsageRecord]) -> None:
        self.started.set()
        self.release.wait(10)
        self.batches.append(len(records))
        super().insert(records)


async def test_records_that_arrive_during_a_write_wait_for_the_next_flush(
    gov_database_url: str,
) -> None:
    # A flush that also wrote what arrived meanwhile chained a small transaction after another
    # for as long as requests kept coming (one write per few milliseconds under load).
    store = _SlowStore(gov_database_url)
    meter = UsageMeter(store, flush_interval_s=60.0)
    now = datetime.now(UTC)
    try:
        for i in range(3):
            meter.record(_record("t", "k", "m", now + timedelta(microseconds=i)))
        flushing = asyncio.create_task(meter.flush())
        while not store.started.is_set():
            await asyncio.sleep(0.005)
        meter.record(_record("t", "k", "m", now + timedelta(microseconds=9)))  # mid-write
        store.release.set()
        assert await flushing
        assert store.batches == [3] and meter.pending == 1 and store.count() == 3
        await meter.aclose()  # shutdown writes everything left
        assert store.batches == [3, 1] and meter.pending == 0 and store.count() == 4
    finally:
        store.close()


def test_alias_moves_of_the_servers_registry_land_in_the_audit_trail(
    gov_database_url: str, tmp_path: Path
) -> None:
    from lmaas.bootstrap.settings import Settings
    from lmaas.bootstrap.wiring import open_registry

    src = _tiny_model_dir(tmp_path)
    settings = Settings(home=tmp_path / "home", database_url=gov_database_url, offline=True)
    governance = GovernanceService.open(gov_database_url, key_cache_ttl_s=0)
    registry = open_registry(settings, governance)  # as `lmaas serve` opens it
    try:
        for _ in range(2):
            registry.import_model(str(src), name="m")
        registry.set_alias("m", "production", "1", actor="lmaas-0123456789ab")
        registry.set_alias("m", "production", "2")  # no actor given: the service's own
        with pytest.raises(ModelNotFoundError):
            registry.set_alias("m", "production", "9")  # refused: nothing moved, nothing audited
        registry.remove_alias("m", "production", actor="lmaas-0123456789ab")
        rows = governance.list_audit(after_seq=0)
        at = [{"model": "m", "alias": "production", "version": v} for v in ("1", "2")]
        assert [(r.actor, r.action, r.target, r.before, r.after) for r in rows] == [
            ("lmaas-0123456789ab", "alias.move", "m@production", None, at[0]),
            ("system", "alias.move", "m@production", at[0], at[1]),
            ("lmaas-0123456789ab", "alias.remove", "m@production", at[1], None),
        ]
        assert governance.verify_audit().ok
    finally:
        registry.close()
        governance.close()


def test_concurrent_audited_moves_keep_one_chain_in_history_order(
    gov_database_url: str, tmp_path: Path
) -> None:
    """Each move writes its audit row in its own transaction, after taking the alias row's
    lock: concurrent moves leave an unforked chain whose rows follow the history's order."""
    from lmaas.bootstrap.settings import Settings
    from lmaas.bootstrap.wiring import open_registry

    settings = Settings(home=tmp_path / "home", database_url=gov_database_url, offline=True)
    governance = GovernanceService.open(gov_database_url, key_cache_ttl_s=0)
    registry = open_registry(settings, governance)
    errors: list[BaseException] = []

    def mover(version: str) -> None:
        try:
            for _ in range(5):
                registry.set_alias("m", "production", version, actor=f"mover-{version}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    try:
        src = _tiny_model_dir(tmp_path)
        for _ in range(3):
            registry.import_model(str(src), name="m")
        threads = [threading.Thread(target=mover, args=(v,)) for v in ("1", "2", "3")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        history = registry.history("m")
        rows = governance.list_audit(after_seq=0, action="alias.move")
        assert len(rows) == len(history) == 15
        assert governance.verify_audit().ok
        assert [(r.actor, (r.before or {}).get("version"), r.after) for r in rows] == [
            (
                h.actor,
                h.previous_version,
                {"model": "m", "alias": "production", "version": h.version},
            )
            for h in history
        ]
    finally:
        registry.close()
        governance.close()
