"""A cheap open-loop HTTP/1.1 load generator: fixed-schedule sends, latency from the schedule.

What a latency bar of a fraction of a millisecond at a few hundred requests per second needs,
and what ``httpx``/``aiohttp`` clients cost too much for on a small machine (their per-request
work, 1-4 ms of CPU here, is more than the gateway's): requests are pre-encoded bytes written
on a pool of keep-alive connections (``asyncio.Protocol``, no tasks, no stream readers), and a
response is complete when its ``Content-Length`` bytes have arrived, timed in the callback that
received them.

The schedule is open loop: request ``i`` is due at ``offsets[i]`` (constant gaps, or Poisson
arrivals as ``lmaas bench serve`` draws them) whatever happened to the earlier ones; when every
connection is busy a new one is opened. Latency is counted from the **due** time, so a client
or server that falls behind shows its queueing instead of hiding it (coordinated omission);
the lag between due and actual write is reported too, to show the client kept up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Literal

from lmaas.bench.prompts import arrival_offsets
from lmaas.core.errors import InvalidRequestError

Arrivals = Literal["constant", "poisson"]


def encode_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    """One ``POST`` with a JSON body, keep-alive, ready to write as is."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def schedule(num_requests: int, rate: float, arrivals: Arrivals, seed: int = 0) -> list[float]:
    """Due times in seconds after the start: ``i / rate``, or Poisson arrivals."""
    if rate <= 0 or math.isinf(rate):
        raise InvalidRequestError(f"rate must be positive and finite, got {rate}", param="rate")
    if arrivals == "poisson":
        return arrival_offsets(num_requests, rate, 1.0, seed)
    return [i / rate for i in range(num_requests)]


@dataclass(slots=True)
class OpenLoopResult:
    """What one :func:`run_open_loop` saw; times in seconds."""

    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)
    """Due time → last byte, for the 2xx answers."""
    service_s: list[float] = field(default_factory=list)
    """Actual write → last byte, for the 2xx answers (what the server and the wire took)."""
    send_lag_s: list[float] = field(default_factory=list)
    """Due time → actual write, for every request (the client's own lateness)."""
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    """Requests that got no answer (connection lost, timeout)."""
    connections_opened: int = 0
    span_s: float = 0.0
    """First due time → last answer."""

    @property
    def completed_per_s(self) -> float:
        """2xx answers per second of the run: what the server really sustained."""
        return len(self.latencies_s) / self.span_s if self.span_s > 0 else 0.0


@dataclass(slots=True)
class _Pending:
    due: float
    sent: float


Done = Callable[["_Connection", _Pending, int | None], None]


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight (no pipelining).

    ``keep_body``: the last response's body is kept in :attr:`body` (for the closed loop's
    callers, who read what came back)."""

    def __init__(self, on_done: Done, keep_body: bool = False) -> None:
        self._on_done = on_done
        self._keep_body = keep_body
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: _Pending | None = None
        self._need = -1  # total bytes of the response being read, once its head is in
        self._body_start = 0
        self._status = 0
        self.body = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, request: bytes, due: float) -> None:
        assert self._transport is not None and self._pending is None
        self._pending = _Pending(due, perf_counter())
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._need < 0 and not self._read_head():
            return
        if len(self._buffer) >= self._need:
            pending, self._pending = self._pending, None
            if self._keep_body:
                self.body = bytes(self._buffer[self._body_start : self._need])
            del self._buffer[: self._need]
            self._need = -1
            if pending is not None:
                self._on_done(self, pending, self._status)

    def _read_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).lower()
        self._status = int(head[9:12])
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:  # chunked or close-delimited: not what the servers under test send
            self.close()
            return False
        value_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
        self._body_start = end + 4
        self._need = end + 4 + length
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self._pending = self._pending, None
        if pending is not None:
            self._on_done(self, pending, None)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


@dataclass(slots=True, frozen=True)
class OpenLoopConfig:
    """One open-loop run against ``host:port``."""

    host: str
    port: int
    request: bytes
    """The encoded request (:func:`encode_request`), sent as is every time."""
    rate: float = 200.0
    duration_s: float = 20.0
    arrivals: Arrivals = "constant"
    connections: int = 8
    """Opened before the first send; more are opened when all are busy."""
    timeout_s: float = 30.0
    """How long the run waits for the last answers after the last send."""
    seed: int = 0


class _Run:
    """The state of one run: the idle pool, the outstanding count, the results."""

    def __init__(self, config: OpenLoopConfig) -> None:
        self.config = config
        self.result = OpenLoopResult()
        self.idle: deque[_Connection] = deque()
        self.every: list[_Connection] = []
        self.outstanding = 0
        self.last_done = 0.0
        self.drained = asyncio.Event()
        self.closing = False

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Connection(self.on_done), self.config.host, self.config.port
        )
        self.result.connections_opened += 1
        self.every.append(conn)
        return conn

    def on_done(self, conn: _Connection, pending: _Pending, status: int | None) -> None:
        if self.closing:
            return
        now = perf_counter()
        result = self.result
        self.outstanding -= 1
        self.last_done = now
        if status is None:
            result.errors += 1
        else:
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                result.latencies_s.append(now - pending.due)
                result.service_s.append(now - pending.sent)
        if not conn.closed:
            self.idle.append(conn)
        if self.outstanding == 0:
            self.drained.set()

    async def send(self, due: float) -> None:
        conn = self.idle.popleft() if self.idle else await self.connect()
        self.outstanding += 1
        self.drained.clear()
        conn.send(self.config.request, due)
        self.result.send_lag_s.append(perf_counter() - due)
        self.result.sent += 1


async def run_open_loop(config: OpenLoopConfig) -> OpenLoopResult:
    """Send ``config.request`` at ``config.rate`` for ``config.duration_s`` (see the module
    docstring); returns when every request is answered or ``timeout_s`` after the last send.

    Raises:
        OSError: the first connections could not be opened.
    """
    run = _Run(config)
    for _ in range(config.connections):
        run.idle.append(await run.connect())
    offsets = schedule(int(config.rate * config.duration_s), config.rate, config.arrivals)
    begin = perf_counter() + 0.01
    for offset in offsets:
        due = begin + offset
        delay = due - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await run.send(due)
    if run.outstanding:
        try:
            await asyncio.wait_for(run.drained.wait(), config.timeout_s)
        except TimeoutError:
            run.result.errors += run.outstanding
    run.result.span_s = (run.last_done or perf_counter()) - begin
    run.closing = True
    for conn in run.every:
        conn.close()
    await asyncio.sleep(0)  # let the transports close
    return run.result


@dataclass(slots=True)
class ClosedLoopResult:
    """What one :func:`run_closed_loop` saw; times in seconds, per request in input order."""

    duration_s: float = 0.0
    """First send → last answer."""
    latencies_s: list[float | None] = field(default_factory=list)
    statuses: list[int | None] = field(default_factory=list)
    """None: no answer (connection lost, or the run's timeout)."""
    bodies: list[bytes] = field(default_factory=list)


async def run_closed_loop(
    host: str, port: int, requests: list[bytes], concurrency: int, timeout_s: float = 600.0
) -> ClosedLoopResult:
    """Send every encoded request once (:func:`encode_request`) with ``concurrency`` of them in
    flight on as many keep-alive connections, each connection sending its next request as soon
    as the previous answer is in: the closed loop of a fixed concurrency, at the cost of this
    module's open loop (no tasks, no stream readers: on a small machine the client's CPU is
    the servers' CPU). Bodies are kept, undecoded, for the caller to check after the timing.

    Raises:
        OSError: the connections could not be opened.
    """
    loop = asyncio.get_running_loop()
    count = len(requests)
    result = ClosedLoopResult(
        latencies_s=[None] * count, statuses=[None] * count, bodies=[b""] * count
    )
    next_index = 0
    answered = 0
    finished = loop.create_future()
    index_of: dict[_Connection, int] = {}

    def start(conn: _Connection) -> None:
        nonlocal next_index
        if next_index >= count or conn.closed:
            return
        index_of[conn] = next_index
        next_index += 1
        conn.send(requests[index_of[conn]], perf_counter())

    def on_done(conn: _Connection, pending: _Pending, status: int | None) -> None:
        nonlocal answered
        i = index_of.pop(conn)
        result.statuses[i] = status
        if status is not None:
            result.latencies_s[i] = perf_counter() - pending.sent
            result.bodies[i] = conn.body
        answered += 1
        if answered >= count and not finished.done():
            finished.set_result(None)
        else:
            start(conn)

    conns: list[_Connection] = []
    for _ in range(max(1, min(concurrency, count))):
        _, conn = await loop.create_connection(lambda: _Connection(on_done, True), host, port)
        conns.append(conn)
    begin = perf_counter()
    for conn in conns:
        start(conn)
    if count:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(finished), timeout_s)
    result.duration_s = perf_counter() - begin
    for conn in conns:
        conn.close()
    await asyncio.sleep(0)
    return result
