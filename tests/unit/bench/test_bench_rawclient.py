"""The raw streaming client against tiny HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from lmaas.bench.metrics import RequestOutcome
from lmaas.bench.rawclient import RawStreamClient
from lmaas.bench.sse import StreamTimer
from lmaas.bench.transport import StreamFailure
from tests.unit.bench.loopback import read_request

Reply = Callable[[asyncio.StreamWriter, int], Awaitable[bool]]
"""Answers request number n of a connection; False closes the connection."""

OK_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _event(payload: dict[str, object] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def _stream_events(num_tokens: int) -> list[bytes]:
    events = [_event({"choices": [{"text": f"t{i}"}]}) for i in range(num_tokens)]
    usage = {"prompt_tokens": 3, "completion_tokens": num_tokens}
    return [*events, _event({"choices": [], "usage": usage}), _event("[DONE]")]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_request(reader: asyncio.StreamReader, seen: list[bytes]) -> bool:
    request = await read_request(reader)
    if request is not None:
        seen.append(request)
    return request is not None


def _streaming(num_tokens: int = 3, piece_bytes: int = 0) -> Reply:
    """A chunked SSE answer, one event per chunk; ``piece_bytes`` > 0 writes it in pieces
    of that size with a pause between them, so the client sees every kind of split."""

    async def reply(writer: asyncio.StreamWriter, _: int) -> bool:
        data = OK_HEAD + b"".join(_chunk(e) for e in _stream_events(num_tokens)) + b"0\r\n\r\n"
        step = piece_bytes or len(data)
        for start in range(0, len(data), step):
            writer.write(data[start : start + step])
            await writer.drain()
            if piece_bytes:
                await asyncio.sleep(0.001)
        return True

    return reply


class _Server:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = 0
        while await _read_request(reader, self.requests):
            number += 1
            if not await self.reply(writer, number):
                break
        writer.close()


async def _send(reply: Reply, num_requests: int = 1, timeout_s: float = 5.0) -> _Result:
    server = _Server(reply)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        client = RawStreamClient(
            f"http://127.0.0.1:{port}/prefix/", "/v1/completions", {"X-Key": "k"}, timeout_s
        )
        result = _Result(server)
        for _ in range(num_requests):
            timer = StreamTimer(RequestOutcome(start_s=0.0))
            error = None
            try:
                await client.stream(b'{"a":1}', timer)
            except (StreamFailure, ValueError) as exc:
                error = str(exc)
            result.timers.append(timer)
            result.errors.append(error)
        await client.aclose()
    return result


class _Result:
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.timers: list[StreamTimer] = []
        self.errors: list[str | None] = []


@pytest.mark.parametrize("piece_bytes", [0, 1, 5, 17])
def test_a_chunked_stream_is_timed_like_the_httpx_client(piece_bytes: int) -> None:
    result = asyncio.run(_send(_streaming(4, piece_bytes)))
    assert result.errors == [None]
    timer = result.timers[0]
    assert (timer.num_chunks, timer.usage_seen, timer.done) == (4, True, True)
    assert (timer.outcome.output_tokens, timer.outcome.prompt_tokens) == (4, 3)
    assert timer.text == "t0t1t2t3" and len(timer.outcome.itl_s) == 3
    head = result.server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /prefix/v1/completions HTTP/1.1"
    assert b"X-Key: k" in head and b"Content-Length: 7" in head


def test_requests_reuse_one_keep_alive_connection() -> None:
    result = asyncio.run(_send(_streaming(2), num_requests=3))
    assert result.errors == [None, None, None]
    assert result.server.connections == 1 and len(result.server.requests) == 3


def test_an_http_error_carries_its_status_and_body() -> None:
    async def refuse(writer: asyncio.StreamWriter, _: int) -> bool:
        body = b'{"error": {"message": "model nope not found"}}'
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    result = asyncio.run(_send(refuse, num_requests=2))
    assert result.errors[0] == 'HTTP 404: {"error": {"message": "model nope not found"}}'
    assert result.errors[1] == result.errors[0] and result.server.connections == 1


def test_an_error_event_and_a_bad_payload_fail_the_request() -> None:
    events = [_event({"error": {"message": "boom"}}), b"data: {nope\n\n"]

    async def error_event(writer: asyncio.StreamWriter, _: int) -> bool:
        event = events.pop(0)
        writer.write(OK_HEAD + _chunk(event) + b"0\r\n\r\n")
        return True

    result = asyncio.run(_send(error_event, num_requests=2))
    assert result.errors[0] == 'error event: {"message": "boom"}'
    assert result.errors[1] is not None and "Expecting property name" in result.errors[1]
    assert result.server.connections == 2  # a stream left half-read is not reused


def test_a_connection_lost_mid_stream_is_a_failure() -> None:
    async def hang_up(writer: asyncio.StreamWriter, _: int) -> bool:
        writer.write(OK_HEAD + _chunk(_stream_events(2)[0]))
        await writer.drain()
        return False

    result = asyncio.run(_send(hang_up))
    assert result.errors == [
        "RemoteProtocolError: the server closed the connection in the response"
    ]


def test_a_stalled_stream_times_out() -> None:
    async def stall(writer: asyncio.StreamWriter, _: int) -> bool:
        writer.write(OK_HEAD + _chunk(_stream_events(2)[0]))
        await asyncio.sleep(0.5)
        return False

    result = asyncio.run(_send(stall, timeout_s=0.2))
    assert result.errors == ["ReadTimeout: no data for 0.2 s"]
    assert result.timers[0].num_chunks == 1


def test_a_keep_alive_connection_closed_while_idle_is_replaced() -> None:
    # The server reads the second request on a connection and hangs up without an answer,
    # as a server whose keep-alive timer fired: the client sends it again on a new one.
    stream = _streaming(2)

    async def once_per_connection(writer: asyncio.StreamWriter, number: int) -> bool:
        return number == 1 and await stream(writer, number)

    result = asyncio.run(_send(once_per_connection, num_requests=2))
    assert result.errors == [None, None]
    assert result.server.connections == 2 and len(result.server.requests) == 3


def test_a_close_delimited_body_and_connection_close() -> None:
    async def http10(writer: asyncio.StreamWriter, _: int) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"".join(_stream_events(2)))
        return False

    result = asyncio.run(_send(http10, num_requests=2))
    assert result.errors == [None, None] and result.server.connections == 2
    assert result.timers[1].num_chunks == 2


def test_a_refused_connection_is_a_connect_error() -> None:
    async def run() -> str:
        client = RawStreamClient("http://127.0.0.1:9", "/v1/completions", {}, 5.0)
        with pytest.raises(StreamFailure) as info:
            await client.stream(b"{}", StreamTimer(RequestOutcome(start_s=0.0)))
        await client.aclose()
        return str(info.value)

    assert asyncio.run(run()).startswith("ConnectError: ")


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="http://host"):
        RawStreamClient("https://example.com", "/v1/completions", {}, 5.0)


def test_a_cancelled_request_closes_its_connection() -> None:
    stream, calls = _streaming(2), []

    async def stall_once(writer: asyncio.StreamWriter, number: int) -> bool:
        calls.append(number)
        if len(calls) > 1:
            return await stream(writer, number)
        writer.write(OK_HEAD + _chunk(_stream_events(2)[0]))
        await asyncio.sleep(0.3)
        return False

    async def run() -> tuple[int, int, int]:
        server = _Server(stall_once)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        async with listener:
            port = listener.sockets[0].getsockname()[1]
            client = RawStreamClient(f"http://127.0.0.1:{port}", "/v1/completions", {}, 5.0)
            cut, whole = (StreamTimer(RequestOutcome(start_s=0.0)) for _ in range(2))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.stream(b"{}", cut), 0.1)
            await client.stream(b"{}", whole)  # on a new connection: the old one is closed
            await client.aclose()
            await asyncio.sleep(0.3)
        return cut.num_chunks, whole.num_chunks, server.connections

    assert asyncio.run(run()) == (1, 2, 2)
