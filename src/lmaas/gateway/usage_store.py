"""The usage table: one :class:`UsageRecord` per metered request, the SQL store that writes
them in batches (:mod:`lmaas.gateway.usage_insert`) and the aggregations behind
``/admin/usage`` and ``lmaas usage`` (by tenant, key, model and day; JSON or CSV).

What is metered and when a record is written: :mod:`lmaas.gateway.usage`.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from lmaas.core.errors import InvalidRequestError
from lmaas.gateway.keys import normalize_key_id
from lmaas.gateway.quotas import Consumed
from lmaas.gateway.usage_insert import MultiRowInsert
from lmaas.registry.metadata import open_migrated_engine

GroupBy = Literal["tenant", "key", "model", "day"]
GROUP_BY_FIELDS: tuple[GroupBy, ...] = ("tenant", "key", "model", "day")


# --------------------------------------------------------------------------- the record


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class UsageRecord:
    """One served request, as billed."""

    request_id: str
    model: str
    status: int
    tenant: str | None = None
    key_id: str | None = None
    version: str = ""
    task: str = ""
    route: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    audio_seconds: float = 0.0
    images: int = 0
    latency_ms: float = 0.0
    cancelled: bool = False
    at: datetime = field(default_factory=_utcnow)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


# --------------------------------------------------------------------------- the table


class _Base(DeclarativeBase):
    """Declarative base of the usage table (created by migration 0003)."""


class UsageRow(_Base):
    __tablename__ = "usage"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    day: Mapped[str] = mapped_column(String(10))
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32))
    route: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    embedding_tokens: Mapped[int] = mapped_column(BigInteger)
    audio_seconds: Mapped[float] = mapped_column(Float)
    images: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    cancelled: Mapped[bool] = mapped_column(Boolean)


_USAGE = cast(Table, UsageRow.__table__)
_RECORD_FIELDS = tuple(f.name for f in fields(UsageRecord))


def _row_values(record: UsageRecord) -> dict[str, Any]:
    # A shallow copy: dataclasses.asdict deep-copies every value (a third of a write's CPU).
    values = {name: getattr(record, name) for name in _RECORD_FIELDS}
    values["day"] = record.at.astimezone(UTC).strftime("%Y-%m-%d")
    values["request_id"] = record.request_id[:128]
    return values


_SUMS: dict[str, Any] = {
    "requests": func.count(UsageRow.id),
    "prompt_tokens": func.coalesce(func.sum(UsageRow.prompt_tokens), 0),
    "completion_tokens": func.coalesce(func.sum(UsageRow.completion_tokens), 0),
    "embedding_tokens": func.coalesce(func.sum(UsageRow.embedding_tokens), 0),
    "audio_seconds": func.coalesce(func.sum(UsageRow.audio_seconds), 0.0),
    "images": func.coalesce(func.sum(UsageRow.images), 0),
    "errors": func.coalesce(func.sum((UsageRow.status >= 400).cast(Integer)), 0),
    "cancelled": func.coalesce(func.sum(UsageRow.cancelled.cast(Integer)), 0),
    "latency_ms_avg": func.coalesce(func.avg(UsageRow.latency_ms), 0.0),
}
_GROUP_COLUMNS: dict[str, Any] = {
    "tenant": UsageRow.tenant,
    "key": UsageRow.key_id,
    "model": UsageRow.model,
    "day": UsageRow.day,
}
USAGE_COLUMNS: tuple[str, ...] = (*_SUMS, "total_tokens")


DEFAULT_GROUP_BY: tuple[GroupBy, ...] = ("day", "tenant", "model")


@dataclass(slots=True, frozen=True)
class UsageQuery:
    """Which records to aggregate, and how to group them."""

    group_by: tuple[GroupBy, ...] = DEFAULT_GROUP_BY
    since: datetime | None = None
    """Inclusive."""
    until: datetime | None = None
    """Exclusive."""
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None


def parse_group_by(values: Sequence[str]) -> tuple[GroupBy, ...]:
    """``["tenant,model", "day"]`` → ``("tenant", "model", "day")``.

    Raises:
        InvalidRequestError: an unknown field.
    """
    fields: list[GroupBy] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            if name not in GROUP_BY_FIELDS:
                raise InvalidRequestError(
                    f"cannot group usage by {name[:40]!r}: use {', '.join(GROUP_BY_FIELDS)}",
                    param="group_by",
                )
            if name not in fields:
                fields.append(name)
    return tuple(fields)


def parse_time(value: str | None, param: str) -> datetime | None:
    """An ISO date or date-time (UTC when it has no offset); None stays None.

    Raises:
        InvalidRequestError: not ISO 8601.
    """
    if value is None or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequestError(
            f"{param} must be an ISO date or date-time (2026-01-31, 2026-01-31T12:00:00Z), "
            f"not {value[:40]!r}",
            param=param,
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class SqlUsageStore:
    """The ``usage`` table over SQLAlchemy (the registry's DB and Alembic chain).

    Args:
        url: SQLAlchemy URL of the metadata DB.

    Raises:
        InternalError: the DB cannot be opened or migrated.
    """

    def __init__(self, url: str) -> None:
        self._engine = open_migrated_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._dialect = self._engine.dialect.name
        self._multi_row = MultiRowInsert(_USAGE, self._engine.dialect, conflict_key="id")

    def insert(self, records: Sequence[UsageRecord]) -> None:
        """Write records in one transaction; a record already written (by id) is skipped."""
        if not records:
            return
        values = [_row_values(r) for r in records]
        if self._multi_row.supported:
            with self._engine.begin() as conn:
                self._multi_row.execute(conn, values)
            return
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement: Any = pg_insert(_USAGE).on_conflict_do_nothing(index_elements=["id"])
        elif self._dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(_USAGE).on_conflict_do_nothing(index_elements=["id"])
        else:
            statement = insert(_USAGE)
        # Core, not the ORM session: one executemany without per-row ORM bookkeeping.
        with self._engine.begin() as conn:
            conn.execute(statement, values)

    def list_records(self, query: UsageQuery | None = None, limit: int = 1000) -> list[UsageRow]:
        """Raw rows, oldest first (tests, debugging)."""
        statement = self._filtered(select(UsageRow), query or UsageQuery())
        statement = statement.order_by(UsageRow.at, UsageRow.id).limit(limit)
        with self._sessions() as session:
            return list(session.scalars(statement))

    def count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count(UsageRow.id))) or 0)

    def consumed(
        self,
        since: datetime,
        until: datetime,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
    ) -> Consumed:
        """What a tenant or a key used in ``[since, until)``, as quotas count it (requests,
        prompt + generated + embedded tokens, audio seconds, images)."""
        query = UsageQuery(group_by=(), since=since, until=until, tenant=tenant, key_id=key_id)
        tokens = UsageRow.prompt_tokens + UsageRow.completion_tokens + UsageRow.embedding_tokens
        statement = self._filtered(
            select(
                func.count(UsageRow.id),
                func.coalesce(func.sum(tokens), 0),
                func.coalesce(func.sum(UsageRow.audio_seconds), 0.0),
                func.coalesce(func.sum(UsageRow.images), 0),
            ),
            query,
        )
        with self._sessions() as session:
            requests, total, audio, images = session.execute(statement).one()
        return Consumed(float(total), float(requests), float(audio), float(images))

    @staticmethod
    def _filtered(statement: Any, query: UsageQuery) -> Any:
        if query.since is not None:
            statement = statement.where(UsageRow.at >= query.since)
        if query.until is not None:
            statement = statement.where(UsageRow.at < query.until)
        if query.tenant is not None:
            statement = statement.where(UsageRow.tenant == query.tenant)
        if query.key_id is not None:
            statement = statement.where(UsageRow.key_id == query.key_id)
        if query.model is not None:
            statement = statement.where(UsageRow.model == query.model)
        return statement

    def aggregate(self, query: UsageQuery) -> list[dict[str, Any]]:
        """Sums per group (``requests``, tokens, audio seconds, images, errors, cancelled,
        average latency), ordered by the group fields."""
        groups = [_GROUP_COLUMNS[g].label(g) for g in query.group_by]
        sums = [expr.label(name) for name, expr in _SUMS.items()]
        statement = self._filtered(select(*groups, *sums), query)
        if groups:
            columns = [_GROUP_COLUMNS[g] for g in query.group_by]
            statement = statement.group_by(*columns).order_by(*columns)
        with self._sessions() as session:
            rows = session.execute(statement).mappings().all()
        result = []
        for row in rows:
            item: dict[str, Any] = {g: row[g] for g in query.group_by}
            for name in _SUMS:
                value = row[name]
                item[name] = (
                    round(float(value), 3)
                    if name in ("audio_seconds", "latency_ms_avg")
                    else int(value)
                )
            item["total_tokens"] = (
                item["prompt_tokens"] + item["completion_tokens"] + item["embedding_tokens"]
            )
            if item["requests"]:
                result.append(item)
        return result

    def close(self) -> None:
        self._engine.dispose()


def usage_csv(rows: list[dict[str, Any]], group_by: Sequence[str]) -> str:
    """The aggregate as CSV: the group fields, then the sums (a header row first)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*group_by, *USAGE_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def usage_query(
    group_by: Sequence[str] | None = None,
    since: str | None = None,
    until: str | None = None,
    tenant: str | None = None,
    key: str | None = None,
    model: str | None = None,
) -> UsageQuery:
    """The query the admin API and the CLI build from their options (strings as typed).

    Raises:
        InvalidRequestError: an unknown group field, a bad time or key id.
    """
    fields = parse_group_by(group_by) if group_by else DEFAULT_GROUP_BY
    start, end = parse_time(since, "since"), parse_time(until, "until")
    if start is not None and end is not None and end <= start:
        raise InvalidRequestError("until must be after since", param="until")
    return UsageQuery(
        group_by=fields,
        since=start,
        until=end,
        tenant=tenant or None,
        key_id=normalize_key_id(key) if key else None,
        model=model or None,
    )
