"""The usage writer's multi-row INSERT on SQLite and the real PostgreSQL: rows read back exactly
as SQLAlchemy's own insert writes them, batches span several statements, retried ids are
skipped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from lmaas.gateway.usage_insert import PARAMS_PER_STATEMENT, MultiRowInsert
from lmaas.gateway.usage_store import _USAGE, SqlUsageStore, UsageRecord, UsageRow, _row_values


def _records(count: int, start: datetime) -> list[UsageRecord]:
    return [
        UsageRecord(
            request_id=f"req-{i}",
            model="m",
            status=200 if i % 7 else 499,
            tenant=None if i % 5 == 0 else f"t{i % 3}",
            key_id=None if i % 5 == 0 else "0123456789ab",
            version="3",
            task="embedding",
            route="/v1/embeddings",
            embedding_tokens=i,
            audio_seconds=i / 8,
            images=i % 2,
            latency_ms=1.25 + i,
            cancelled=i % 7 == 0,
            at=start + timedelta(seconds=i, microseconds=i),
        )
        for i in range(count)
    ]


def _read(store: SqlUsageStore) -> dict[str, tuple[object, ...]]:
    with store._sessions() as session:
        rows = session.scalars(select(UsageRow)).all()
        return {
            row.id: tuple(getattr(row, c.name) for c in _USAGE.columns if c.name != "id")
            for row in rows
        }


def test_multi_row_rows_equal_sqlalchemys_own_insert(gov_database_url: str) -> None:
    store = SqlUsageStore(gov_database_url)
    try:
        writer = MultiRowInsert(_USAGE, store._engine.dialect, conflict_key="id")
        assert writer.supported
        assert writer.rows_per_statement * len(_USAGE.columns) <= PARAMS_PER_STATEMENT
        count = writer.rows_per_statement * 2 + 3  # three statements, the last one short
        fast = _records(count, datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC))
        store.insert(fast)
        store.insert(fast[:5] + fast[-2:])  # a retried batch: skipped, no error
        slow = _records(count, datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC))
        with store._engine.begin() as conn:  # SQLAlchemy Core: the reference
            conn.execute(_USAGE.insert(), [_row_values(r) for r in slow])
        rows = _read(store)
        assert len(rows) == 2 * count
        for a, b in zip(fast, slow, strict=True):
            assert rows[a.id] == rows[b.id]
        first = rows[fast[1].id]
        assert first[0] == "req-1" and first[-1] is False and first[4] == "0123456789ab"
        assert rows[fast[0].id][3] is None and rows[fast[0].id][-1] is True
        read_at = store.list_records(limit=1)[0].at
        assert (read_at if read_at.tzinfo else read_at.replace(tzinfo=UTC)) == fast[0].at
    finally:
        store.close()
