"""Usage metering: one record per request the gateway served, written in batches off the request
path.

What is metered: every HTTP request that **reached the engine** (a model call was admitted past
authentication, scopes, model visibility and rate limits): its tokens, audio seconds and images,
its latency, the status it was answered with (engine-side failures such as a 400 from the
worker, a 503 or a 504 are metered with that status) and whether the client went away before the
end. Requests refused before a model call (401, 403, 404, 429, a 400 or 413 decided by the
route) are not metered.

How it is hooked (one place for every route): :class:`MeteredEngineClient` is the innermost
per-request view of the engine (``lmaas.api.services.services_of``), under the visibility and
limit views, so it only sees admitted calls; it adds each call's counts into the request's
:class:`RequestUsage`, which the API's metering middleware turns into a :class:`UsageRecord`
when the response is over (streams included) and hands to the :class:`UsageMeter`.

The table is also the durable source of the quotas per day and month
(:meth:`UsageMeter.consumed`, :mod:`lmaas.gateway.quotas`).

Durability: :meth:`UsageMeter.record` only appends to an in-memory buffer (no I/O on the request
path). A background task writes the buffer in one transaction every ``flush_interval_s`` or as
soon as ``batch_size`` records wait; :meth:`UsageMeter.aclose` (the gateway's lifespan, after
SIGTERM drained the requests) writes what is left, so a graceful stop loses nothing and a crash
(SIGKILL, power loss) loses at most the records of the last flush interval. A failed write keeps
the batch and retries; rows are keyed by a record id, so a retry never doubles one.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, cast

import anyio.to_thread
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
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from lmaas.core.errors import (
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from lmaas.core.messages import (
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    SeqDelta,
    TranscriptionResult,
)
from lmaas.engine.protocol import EngineClient, ServedModel
from lmaas.gateway.keys import normalize_key_id
from lmaas.gateway.quotas import Consumed, Window
from lmaas.gateway.usage_insert import MultiRowInsert
from lmaas.registry.metadata import create_db_engine, upgrade_schema

logger = logging.getLogger("lmaas.usage")

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


@dataclass(slots=True)
class RequestUsage:
    """What one HTTP request's model calls used so far (filled by :class:`MeteredEngineClient`)."""

    engaged: bool = False
    """True once a model call was admitted: only such requests are metered."""
    model: str = ""
    version: str = ""
    task: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0
    audio_seconds: float = 0.0
    images: int = 0
    streams_open: int = 0
    cut_short: bool = False
    """A stream was closed before its end (the client went away)."""

    def engage(self, served: ServedModel) -> None:
        self.engaged = True
        self.model, self.version, self.task = served.name, served.version, served.task.value


# --------------------------------------------------------------------------- the engine view


class MeteredEngineClient:
    """An :class:`~lmaas.engine.protocol.EngineClient` that adds each admitted model call's
    counts to the request's :class:`RequestUsage` (exact: the worker's counts, streams
    included)."""

    def __init__(self, engine: EngineClient, usage: RequestUsage) -> None:
        self._engine = engine
        self._usage = usage

    def list_models(self) -> list[ServedModel]:
        return self._engine.list_models()

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        return self._engine.get_model(name, version)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def _engage(self, model: str) -> None:
        try:
            served = self._engine.get_model(model)
        except ModelNotFoundError:
            return  # the call below fails the same way: refused before the engine, not metered
        self._usage.engage(served)

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        self._engage(model)
        stream = self._engine.generate(model, request)
        return _MeteredStream(stream, self._usage)

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        self._engage(model)
        try:
            result = await self._engine.embed(model, request)
        except asyncio.CancelledError:
            self._usage.cut_short = True
            raise
        self._usage.embedding_tokens += result.prompt_tokens
        return result

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        self._engage(model)
        try:
            result = await self._engine.infer(model, request)
        except asyncio.CancelledError:
            self._usage.cut_short = True
            raise
        usage = self._usage
        tokens = int(getattr(result, "prompt_tokens", 0) or 0)
        if isinstance(request, EmbedRequest):
            usage.embedding_tokens += tokens
        else:
            usage.prompt_tokens += tokens
        if isinstance(result, TranscriptionResult):
            usage.audio_seconds += float(result.duration_s)
        if isinstance(request, ClassifyRequest):
            if request.images is not None:
                usage.images += len(request.images)
            elif request.pixel_values is not None and request.pixel_values.shape:
                usage.images += max(0, int(request.pixel_values.shape[0]))
        return result


class _MeteredStream:
    """A token stream that counts prompt and generated tokens as they arrive, and notes whether
    it was closed before its end."""

    __slots__ = ("_done", "_stream", "_usage")

    def __init__(self, stream: AsyncIterator[SeqDelta], usage: RequestUsage) -> None:
        self._stream = stream
        self._usage = usage
        self._done = False
        usage.streams_open += 1

    def __aiter__(self) -> _MeteredStream:
        return self

    def _end(self, cut_short: bool) -> None:
        if not self._done:
            self._done = True
            self._usage.streams_open -= 1
            self._usage.cut_short |= cut_short

    async def __anext__(self) -> SeqDelta:
        try:
            delta = await anext(self._stream)
        except StopAsyncIteration:
            self._end(False)
            raise
        except asyncio.CancelledError:
            self._end(True)
            raise
        except BaseException:
            self._end(False)
            raise
        self._usage.prompt_tokens += delta.prompt_tokens
        self._usage.completion_tokens += delta.num_new_tokens
        return delta

    async def aclose(self) -> None:
        self._end(True)
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


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
        self._engine = create_db_engine(url)
        try:
            upgrade_schema(self._engine)
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise InternalError(f"cannot open the metadata DB: {exc}") from exc
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


# --------------------------------------------------------------------------- the meter


class UsageMeter:
    """The in-memory buffer of usage records and the background task that writes it.

    Args:
        store: Where records go.
        flush_interval_s: Longest a record waits in memory (what a crash may lose).
        batch_size: Write as soon as this many records wait.
        max_buffered: Past this many unwritten records (the DB is down for long), the oldest
            are dropped and counted in :attr:`dropped`, so memory stays bounded.
    """

    def __init__(
        self,
        store: SqlUsageStore,
        *,
        flush_interval_s: float = 0.5,
        batch_size: int = 500,
        max_buffered: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.flush_interval_s = flush_interval_s
        self.batch_size = max(1, batch_size)
        self.max_buffered = max_buffered
        self._buffer: list[UsageRecord] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self.written = 0
        self.dropped = 0
        self.failures = 0

    @property
    def store(self) -> SqlUsageStore:
        return self._store

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def record(self, record: UsageRecord) -> None:
        """Queue one record (no I/O). After :meth:`aclose`, it is written at once."""
        if self._closed:
            try:
                self._store.insert([record])
                self.written += 1
            except SQLAlchemyError:
                logger.exception("usage record %s lost: the meter is closed", record.request_id)
                self.dropped += 1
            return
        self._buffer.append(record)
        if len(self._buffer) > self.max_buffered:
            drop = len(self._buffer) - self.max_buffered
            del self._buffer[:drop]
            self.dropped += drop
            logger.error("usage buffer full: %d records dropped", drop)
        if len(self._buffer) >= self.batch_size and self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        """Start the flusher on the running loop."""
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._run(), name="lmaas-usage-flusher")

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Write the records buffered when called (in batches); False when a write failed (kept,
        retried).

        Records that arrive while it writes wait for the next flush: writing them at once too
        chained a small transaction (and its fsync) after another for as long as requests kept
        coming, a write every few milliseconds instead of one per flush interval."""
        lock = self._lock or asyncio.Lock()
        async with lock:
            pending = len(self._buffer)
            while pending > 0 and self._buffer:
                batch = self._buffer[: min(pending, self.batch_size * 4)]
                try:
                    await anyio.to_thread.run_sync(self._store.insert, batch)
                except SQLAlchemyError:
                    self.failures += 1
                    logger.exception("writing %d usage records failed; will retry", len(batch))
                    return False
                del self._buffer[: len(batch)]
                self.written += len(batch)
                pending -= len(batch)
        return True

    async def aclose(self, attempts: int = 3) -> None:
        """Stop the flusher and write what is left (the gateway's shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        failures = 0
        while self._buffer and failures < attempts:
            if not await self.flush():
                failures += 1
                await asyncio.sleep(0.2)
        if self._buffer:
            logger.error("%d usage records could not be written at shutdown", len(self._buffer))
            self.dropped += len(self._buffer)
            self._buffer.clear()
        self._closed = True

    async def consumed(self, kind: str, name: str, window: Window) -> Consumed:
        """What ``kind`` (``key``/``tenant``) ``name`` used in ``window``: the quotas' durable
        source. Buffered records are written first, so the answer holds every request this
        gateway finished.

        Raises:
            ServiceUnavailableError: the DB cannot be read (503: quotas fail closed).
        """
        await self.flush()
        key_id = normalize_key_id(name) if kind == "key" else None
        tenant = None if kind == "key" else name

        def load() -> Consumed:
            return self._store.consumed(window.start, window.end, tenant=tenant, key_id=key_id)

        try:
            return await anyio.to_thread.run_sync(load)
        except SQLAlchemyError as exc:
            logger.warning("cannot load a quota window from the usage table: %s", exc)
            raise ServiceUnavailableError(
                "the usage DB is unreachable: quotas cannot be checked; retry later",
                retry_after_s=1.0,
            ) from None

    def close(self) -> None:
        self._store.close()


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
