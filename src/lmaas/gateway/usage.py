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
:class:`RequestUsage`, which the API's metering middleware turns into a
:class:`~lmaas.gateway.usage_store.UsageRecord` when the response is over (streams included)
and hands to the :class:`UsageMeter`.

The table (:mod:`lmaas.gateway.usage_store`) is also the durable source of the quotas per day
and month (:meth:`UsageMeter.consumed`, :mod:`lmaas.gateway.quotas`).

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
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError

from lmaas.core.errors import ModelNotFoundError, ServiceUnavailableError
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
from lmaas.gateway.usage_store import SqlUsageStore, UsageRecord

logger = logging.getLogger("lmaas.usage")


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
