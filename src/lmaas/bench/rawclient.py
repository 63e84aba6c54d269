"""The default client of ``lmaas bench serve``: streamed POSTs over plain HTTP/1.1 at low CPU.

On a small machine the load generator shares the cores with the server it measures, and every
millisecond it spends is taken from the model. httpx costs several milliseconds of CPU per
request and tens of microseconds per streamed chunk; this client is built like the open loop of
:mod:`lmaas.bench.openloop`: an ``asyncio.Protocol`` per keep-alive connection (no stream
readers, no task per connection), the request written as one pre-encoded buffer, the response
read by the sans-IO :class:`~lmaas.bench.http1.ResponseParser` (chunked or ``Content-Length``
bodies) in the callback that received the bytes, and each SSE line handed to the same
:class:`~lmaas.bench.sse.SSEDecoder` and :class:`~lmaas.bench.sse.StreamTimer` as the httpx
client, timed at the ``data_received`` that brought it.

One request is in flight per connection; a request takes an idle connection or opens one, so
at most as many are open as requests are in flight. ``http://`` only: ``https`` stays with
:class:`~lmaas.bench.transport.HttpxStreamClient`.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from urllib.parse import urlsplit

from lmaas.bench.http1 import ProtocolError, ResponseParser
from lmaas.bench.sse import SSEDecoder, StreamTimer
from lmaas.bench.transport import StreamFailure

CONNECT_TIMEOUT_S = 30.0
"""As the httpx client's connect timeout."""

_MAX_ERROR_BODY_BYTES = 4096


class _StaleConnection(StreamFailure):
    """A reused keep-alive connection closed before any byte of the answer: the server had
    closed it while idle, so the request is sent again on a fresh one."""


class _SSESink:
    """Splits body bytes into lines for the SSE decoder, and the events into the timer."""

    __slots__ = ("_decoder", "_partial", "_timer")

    def __init__(self, timer: StreamTimer) -> None:
        self._decoder = SSEDecoder()
        self._timer = timer
        self._partial = b""

    def feed(self, body: bytes, now_s: float) -> None:
        if self._partial:
            body = self._partial + body
        lines = body.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            for payload in self._decoder.feed(line.decode(errors="replace")):
                self._timer.on_payload(payload, now_s)

    def finish(self, now_s: float) -> None:
        if self._partial:
            self.feed(b"\n", now_s)
        for payload in self._decoder.flush():
            self._timer.on_payload(payload, now_s)


class _StreamConnection(asyncio.Protocol):
    """One keep-alive connection that runs one streamed request at a time."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._parser = ResponseParser()
        self._sink: _SSESink | None = None
        self._error_body = b""
        self._done: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_data_s = 0.0
        self._received = False
        self.num_requests = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def start(self, request: bytes, sink: _SSESink) -> asyncio.Future[None]:
        """Write ``request``; the future ends with the response (or its failure)."""
        assert self._transport is not None and self._done is None
        loop = asyncio.get_running_loop()
        self._done = done = loop.create_future()
        self._sink = sink
        self._error_body = b""
        self._received = False
        self._parser.reset()
        self.num_requests += 1
        self._last_data_s = perf_counter()
        self._watchdog = loop.call_later(self._timeout_s, self._check_timeout)
        self._transport.write(request)
        return done

    def data_received(self, data: bytes) -> None:
        now_s = perf_counter()
        self._last_data_s = now_s
        self._received = True
        if self._done is None:  # nothing asked for: not a server we understand
            self.close()
            return
        parser = self._parser
        try:
            body = parser.feed(data)
            if parser.status == 200:
                if body:
                    assert self._sink is not None
                    self._sink.feed(body, now_s)
            elif len(self._error_body) < _MAX_ERROR_BODY_BYTES:
                self._error_body += body
            if parser.complete:
                self._complete(now_s)
        except ProtocolError as exc:
            self._fail(StreamFailure(f"RemoteProtocolError: {exc}"))
        except ValueError as exc:  # from the timer: not JSON, or an error event
            self._fail(exc)

    def _complete(self, now_s: float) -> None:
        status = self._parser.status
        if status == 200:
            assert self._sink is not None
            self._sink.finish(now_s)
        done = self._release()
        if not self._parser.keep_alive:
            self.close()
        if done is None:
            return
        if status == 200:
            done.set_result(None)
        else:
            text = self._error_body.decode(errors="replace").strip()
            done.set_exception(StreamFailure(f"HTTP {status}: {text}"))

    def _release(self) -> asyncio.Future[None] | None:
        done, self._done, self._sink = self._done, None, None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        return done

    def _fail(self, exc: Exception) -> None:
        done = self._release()
        self.close()
        if done is not None and not done.done():
            done.set_exception(exc)

    def _check_timeout(self) -> None:
        idle_s = perf_counter() - self._last_data_s
        if idle_s < self._timeout_s:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self._timeout_s - idle_s, self._check_timeout)
            return
        self._fail(StreamFailure(f"ReadTimeout: no data for {self._timeout_s:g} s"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is None:
            return
        if self._parser.head_done and self._parser.eof():  # a close-delimited body
            try:
                self._complete(perf_counter())
            except ValueError as error:
                self._fail(error)
            return
        reason = f" ({exc})" if exc is not None else ""
        if not self._received and self.num_requests > 1:
            self._fail(_StaleConnection(f"RemoteProtocolError: connection closed{reason}"))
            return
        where = "in the response" if self._received else "before the response"
        message = f"RemoteProtocolError: the server closed the connection {where}{reason}"
        self._fail(StreamFailure(message))

    @property
    def in_flight(self) -> bool:
        """A request was started and has not ended."""
        return self._done is not None

    def close(self) -> None:
        """Close the connection, dropping the request in flight without a word to it."""
        self._release()
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class RawStreamClient:
    """Streamed POSTs to ``base_url + path`` on keep-alive connections (see the module
    docstring); implements :class:`~lmaas.bench.transport.StreamClient`.

    Raises:
        ValueError: from the constructor, for a URL that is not ``http://host[:port][/prefix]``.
    """

    def __init__(self, base_url: str, path: str, headers: dict[str, str], timeout_s: float) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"the raw client needs an http://host URL, got {base_url!r}")
        self._host = url.hostname
        self._port = url.port or 80
        self._timeout_s = timeout_s
        host = f"[{self._host}]" if ":" in self._host else self._host
        lines = [
            f"POST {url.path.rstrip('/')}{path} HTTP/1.1",
            f"Host: {host}:{self._port}",
            "Accept: */*",
            "User-Agent: lmaas-bench",
            "Content-Type: application/json",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: list[_StreamConnection] = []
        self._open: set[_StreamConnection] = set()

    async def stream(self, body: bytes, timer: StreamTimer) -> None:
        request = b"%s%d\r\n\r\n%s" % (self._head, len(body), body)
        conn = await self._connection()
        try:
            await self._send(conn, request, timer)
        except _StaleConnection:
            await self._send(await self._new_connection(), request, timer)

    async def _send(self, conn: _StreamConnection, request: bytes, timer: StreamTimer) -> None:
        done = conn.start(request, _SSESink(timer))
        try:
            await done
        finally:
            if conn.in_flight:  # cancelled: the rest of the answer would confuse the next
                conn.close()
            if conn.closed:
                self._open.discard(conn)
            else:
                self._idle.append(conn)

    async def _connection(self) -> _StreamConnection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._open.discard(conn)
        return await self._new_connection()

    async def _new_connection(self) -> _StreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(
                    lambda: _StreamConnection(self._timeout_s), self._host, self._port
                )
        except TimeoutError:
            raise StreamFailure(
                f"ConnectTimeout: no connection in {CONNECT_TIMEOUT_S:g} s"
            ) from None
        except OSError as exc:
            raise StreamFailure(f"ConnectError: {exc}") from exc
        self._open.add(conn)
        return conn

    async def aclose(self) -> None:
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close
