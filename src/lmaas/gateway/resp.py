"""A lean Redis client for the rate limiter's scripts: one pipelined connection, RESP2.

Why not redis-py's asyncio client: every admission of a governed request runs one script and
settles with another, so the client is on the hot path of every request. redis-py spends
~180 µs of gateway CPU per ``EVALSHA`` here (command packing, the retry wrapper, the connection
pool's locks), this client ~45 µs (measured on the 2-core development machine; see
``docs/benchmarks.md``, issue 5), and the settle needs no task of its own: it is written to the
socket and its reply is matched later. The limiter only ever runs a few commands
(``EVALSHA``, ``SCRIPT LOAD``, ``EXISTS``), so the protocol it needs is small:

* One TCP (or Unix, or TLS) connection per client, opened on first use and again after a loss.
  Commands are written as they come; Redis answers in order, so replies are matched to a FIFO of
  futures (pipelining for free: concurrent requests never wait for each other's round trip).
* A command that gets no reply within ``timeout_s``, or a connection that breaks, fails every
  command in flight with :class:`RedisConnectionError` and drops the connection; the next
  command reconnects. Error replies raise :class:`RedisReplyError` (only that command).
* :meth:`RespClient.run_script` sends ``EVALSHA``, and on ``NOSCRIPT`` (a restarted or flushed
  Redis) loads the script and runs it again.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS with the system's
trust store) and ``unix:///path/to/socket[?db=N]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_log = logging.getLogger(__name__)

Arg = str | bytes | int | float


class RedisError(Exception):
    """Anything that keeps a command from getting its answer."""


class RedisReplyError(RedisError):
    """Redis answered the command with an error reply (``-ERR ...``, ``-NOSCRIPT ...``)."""


class RedisConnectionError(RedisError):
    """Redis cannot be reached, the connection broke, or a reply did not come in time."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a Redis is and how to log in (from a ``redis://``, ``rediss://`` or ``unix://``
    URL: :meth:`parse`)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """A Unix socket, instead of host and port."""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Read a Redis URL.

        Raises:
            ValueError: not a ``redis://``, ``rediss://`` or ``unix://`` URL, or a bad db/port.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"a Redis URL starts with redis://, rediss:// or unix://, not {url.split(':')[0]!r}"
            )
        query = parse_qs(parts.query)
        db_text = parts.path.lstrip("/") if parts.scheme != "unix" else ""
        db_text = db_text or (query.get("db") or ["0"])[0]
        try:
            db = int(db_text)
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"the Redis URL {url!r} has a bad port or database number") from None
        if db < 0:
            raise ValueError(f"the Redis database number must be 0 or more, not {db}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            path=parts.path if parts.scheme == "unix" else None,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "rediss",
        )


class Script:
    """A Lua script, run by its SHA-1 (:meth:`RespClient.run_script`)."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    pieces = [f"*{len(args)}\r\n"]
    for arg in args:
        kind = type(arg)
        if kind is str:
            text = str(arg)
        elif kind is int or kind is float:
            text = repr(arg)
        else:
            return _encode_slowly(args)
        pieces.append(f"${len(text)}\r\n{text}\r\n")
    command = "".join(pieces)
    if not command.isascii():  # lengths above counted characters, not bytes
        return _encode_slowly(args)
    return command.encode()


def _encode_slowly(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a Redis argument cannot be a bool")
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(float(arg)).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete:
    """The buffer ends inside a reply (more bytes will come)."""


_INCOMPLETE = _Incomplete()


def parse_reply(buffer: bytes | bytearray, start: int) -> tuple[Any, int] | _Incomplete:
    """One RESP2 reply from ``buffer[start:]``: (value, where the next reply starts), or
    :data:`_INCOMPLETE`. Error replies are returned as :class:`RedisReplyError` values (also
    inside arrays); the caller raises them.

    Raises:
        RedisConnectionError: the bytes are not RESP (the connection cannot be trusted).
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return _INCOMPLETE
    kind = buffer[start]
    line = bytes(buffer[start + 1 : end])
    after = end + 2
    try:
        if kind == 0x2B:  # +
            return line.decode(), after
        if kind == 0x2D:  # -
            return RedisReplyError(line.decode(errors="replace")), after
        if kind == 0x3A:  # :
            return int(line), after
        if kind == 0x24:  # $
            size = int(line)
            if size < 0:
                return None, after
            if len(buffer) < after + size + 2:
                return _INCOMPLETE
            return bytes(buffer[after : after + size]), after + size + 2
        if kind == 0x2A:  # *
            count = int(line)
            if count < 0:
                return None, after
            items: list[Any] = []
            for _ in range(count):
                parsed = parse_reply(buffer, after)
                if isinstance(parsed, _Incomplete):
                    return parsed
                items.append(parsed[0])
                after = parsed[1]
            return items, after
    except ValueError:
        pass
    raise RedisConnectionError(f"Redis sent bytes that are not RESP: {bytes(buffer[start:end])!r}")


class _Connection(asyncio.Protocol):
    """One connection: writes commands, matches replies to the futures in send order.

    Args:
        loop: The loop it runs on.
        timeout_s: A reply later than this drops the connection (one watchdog timer per
            connection, not one per command).
        defer_s: How long a deferred command may wait for company (see :meth:`send`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, defer_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._defer_s = defer_s
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._sent_at: deque[float] = deque()
        self._deferred: list[bytes] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._transport is not None and self.lost is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, data: bytes, *, deferred: bool = False) -> asyncio.Future[Any]:
        """Write one command; its future gets the reply.

        ``deferred``: write it with the next command, or after ``defer_s``, whichever comes
        first: several commands in one system call, and never before the caller's own work of
        this loop turn (a request's settle goes out after its response)."""
        future: asyncio.Future[Any] = self._loop.create_future()
        if not self.alive:
            future.set_exception(
                RedisConnectionError(f"the Redis connection is closed ({self.lost})")
            )
            return future
        assert self._transport is not None
        now = self._loop.time()
        self._waiters.append(future)
        self._sent_at.append(now)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(now + self._timeout_s, self._watch)
        if deferred:
            if self._flush_timer is None:
                self._flush_timer = self._loop.call_later(self._defer_s, self._flush)
            self._deferred.append(data)
        elif self._deferred:  # keep the order the replies will come in
            self._deferred.append(data)
            self._flush()
        else:
            self._transport.write(data)
        return future

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._deferred and self._transport is not None and self.lost is None:
            self._transport.write(b"".join(self._deferred))
        self._deferred.clear()

    def _watch(self) -> None:
        """Drop the connection if the oldest command waits past the timeout, else look again
        when it would."""
        self._watchdog = None
        if not self._sent_at or not self.alive:
            return
        due = self._sent_at[0] + self._timeout_s
        if self._loop.time() >= due:
            self.abort(RedisConnectionError(f"Redis did not answer within {self._timeout_s:g} s"))
        else:
            self._watchdog = self._loop.call_at(due, self._watch)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position = 0
        try:
            while position < len(buffer):
                parsed = parse_reply(buffer, position)
                if isinstance(parsed, _Incomplete):
                    break
                value, position = parsed
                if not self._waiters:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                waiter = self._waiters.popleft()
                self._sent_at.popleft()
                if waiter.done():  # cancelled
                    continue
                if isinstance(value, RedisReplyError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except RedisConnectionError as exc:
            self.abort(exc)
            return
        del buffer[:position]

    def abort(self, reason: BaseException) -> None:
        """Drop the connection and fail every command in flight with ``reason``."""
        if self.lost is None:
            self.lost = reason
        if self._transport is not None:
            self._transport.abort()
        self._fail_waiters()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(
                f"the Redis connection was lost ({exc})" if exc else "Redis closed the connection"
            )
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        for timer in (self._flush_timer, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._watchdog = None
        self._deferred.clear()
        self._sent_at.clear()
        reason = self.lost
        error = reason if isinstance(reason, RedisError) else RedisConnectionError(str(reason))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def close(self) -> None:
        """Write what is deferred, then close."""
        self._flush()
        if self._transport is not None:
            self._transport.close()


class RespClient:
    """A pipelined Redis connection for scripts (see the module docstring).

    Args:
        address: Where Redis is (:meth:`from_url` reads a URL).
        timeout_s: Longest wait for a reply; past it the connection is dropped.
        connect_timeout_s: Longest wait to connect (and log in).
        defer_s: Longest a command sent with :meth:`run_script_nowait` waits to share a write
            with the next command (settles ride with the next admission).
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        defer_s: float = 0.02,
    ) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0 or defer_s < 0:
            raise ValueError("Redis timeouts must be positive (and the deferral not negative)")
        self.address = address
        self.timeout_s = timeout_s
        self.defer_s = defer_s
        self.connect_timeout_s = connect_timeout_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float = 5.0, connect_timeout_s: float = 5.0
    ) -> RespClient:
        """A client for a ``redis://``, ``rediss://`` or ``unix://`` URL (no I/O until used)."""
        return cls(
            RedisAddress.parse(url), timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
        )

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if address.path is not None:
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(loop, self.timeout_s, self.defer_s), address.path
                    )
                else:
                    tls = ssl.create_default_context() if address.tls else None
                    _, connection = await loop.create_connection(
                        lambda: _Connection(loop, self.timeout_s, self.defer_s),
                        address.host,
                        address.port,
                        ssl=tls,
                        server_hostname=address.host if tls else None,
                    )
                login: list[list[Arg]] = []
                if address.password is not None:
                    user = [address.username] if address.username else []
                    login.append(["AUTH", *user, address.password])
                if address.db:
                    login.append(["SELECT", address.db])
                for command in login:
                    await connection.send(encode_command(command))
        except (OSError, TimeoutError) as exc:
            if connection is not None:  # timed out while logging in
                connection.close()
            where = address.path or f"{address.host}:{address.port}"
            raise RedisConnectionError(
                f"cannot connect to Redis at {where}: {exc or type(exc).__name__}"
            ) from None
        except RedisReplyError as exc:
            if connection is not None:
                connection.close()
            raise RedisConnectionError(f"Redis refused the login: {exc}") from None
        return connection

    async def _ready(self) -> _Connection:
        connection = self._connection
        if connection is not None and connection.alive:
            return connection
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        if self._connecting is None:  # one connect, however many commands wait for it
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            connection = await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        self._connection = connection
        return connection

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (bytes, int, str, None or a list of them).

        Raises:
            RedisReplyError: Redis answered with an error.
            RedisConnectionError: no answer (unreachable, connection lost, timed out).
        """
        connection = await self._ready()
        return await connection.send(encode_command(args))

    async def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` the script (loading it first if Redis does not know it)."""
        command = _evalsha(script, keys, args)
        try:
            return await self.execute(*command)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.body)
        return await self.execute(*command)

    def run_script_nowait(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> asyncio.Future[Any]:
        """Start the script without waiting for it: on a live connection, written with the next
        command or within ``defer_s`` (no task of its own; a request's settle goes out after its
        response), else run by a task that connects first. The future carries the reply or the
        error; whoever drops it should look at it (``add_done_callback``)."""
        connection = self._connection
        if connection is None or not connection.alive:
            return asyncio.ensure_future(self.run_script(script, keys, args))
        first = connection.send(encode_command(_evalsha(script, keys, args)), deferred=True)
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(sent: asyncio.Future[Any]) -> None:
            if result.done():
                return
            error = None if sent.cancelled() else sent.exception()
            if isinstance(error, RedisReplyError) and str(error).startswith("NOSCRIPT"):
                retry = asyncio.ensure_future(self.run_script(script, keys, args))
                retry.add_done_callback(lambda r: _copy_outcome(r, result))
                return
            _copy_outcome(sent, result)

        first.add_done_callback(done)
        return result

    async def aclose(self) -> None:
        """Close the connection (commands in flight fail)."""
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _evalsha(script: Script, keys: Sequence[str], args: Sequence[Arg]) -> list[Arg]:
    return ["EVALSHA", script.sha, len(keys), *keys, *args]


def _copy_outcome(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
