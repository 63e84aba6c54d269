"""The open-loop load generator against tiny raw HTTP servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from lmaas.bench.openloop import (
    OpenLoopConfig,
    OpenLoopResult,
    encode_request,
    run_closed_loop,
    run_open_loop,
    schedule,
)
from lmaas.core.errors import InvalidRequestError
from tests.unit.bench.loopback import read_request

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bool:
    return await read_request(reader) is not None


def _answering(delay_s: float, status: int = 200, lock: asyncio.Lock | None = None) -> Handler:
    """Answers every request after ``delay_s`` (one at a time across connections with
    ``lock``), head and body in two writes so the client sees partial reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _read_request(reader):
            body = b'{"ok":true}'
            if lock is None:
                await asyncio.sleep(delay_s)
            else:
                async with lock:
                    await asyncio.sleep(delay_s)
            head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
            await writer.drain()
            writer.write(body)
        writer.close()

    return handle


async def _run(
    handler: Handler, rate: float, duration_s: float, connections: int = 8, timeout_s: float = 5.0
) -> OpenLoopResult:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        request = encode_request("127.0.0.1", port, "/v1/x", b'{"a":1}', {"X-Key": "k"})
        config = OpenLoopConfig(
            "127.0.0.1", port, request, rate, duration_s, connections=connections,
            timeout_s=timeout_s,
        )  # fmt: skip
        return await run_open_loop(config)


def test_encode_request_is_one_keep_alive_post() -> None:
    raw = encode_request("h", 80, "/v1/embeddings", b"{}", {"Authorization": "Bearer k"})
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/embeddings HTTP/1.1"
    assert b"Content-Length: 2" in lines and b"Authorization: Bearer k" in lines
    assert body == b"{}"


def test_schedule_is_constant_or_poisson() -> None:
    assert schedule(4, 200.0, "constant") == [0.0, 0.005, 0.01, 0.015]
    poisson = schedule(100, 50.0, "poisson", seed=1)
    assert poisson[-1] == pytest.approx(2.0) and poisson != schedule(100, 50.0, "constant")
    with pytest.raises(InvalidRequestError):
        schedule(4, 0.0, "constant")


def test_every_request_is_sent_on_schedule_and_timed() -> None:
    result = asyncio.run(_run(_answering(0.002), rate=100.0, duration_s=0.5, connections=2))
    assert result.sent == 50 and result.statuses == {200: 50} and result.errors == 0
    assert all(latency >= 0.002 for latency in result.latencies_s)
    assert all(s <= lat for s, lat in zip(result.service_s, result.latencies_s, strict=True))
    assert result.completed_per_s == pytest.approx(100.0, rel=0.2)


def test_a_slow_server_shows_its_queueing_from_the_due_time() -> None:
    # 20 requests due 10 ms apart, answered one at a time in 20 ms each: the last is answered
    # ~0.4 s after the first was due, ~0.2 s after its own due time; a closed-loop client
    # timing from its own send would have seen ~20 ms.
    lock = asyncio.Lock()
    result = asyncio.run(_run(_answering(0.02, lock=lock), rate=100.0, duration_s=0.2))
    assert result.sent == 20 and len(result.latencies_s) == 20
    assert max(result.latencies_s) > 0.15
    assert result.connections_opened > 8  # all busy: new ones were opened, sends stayed on time


def test_errors_and_statuses_are_counted_not_timed() -> None:
    refused = asyncio.run(_run(_answering(0.0, status=429), rate=100.0, duration_s=0.1))
    assert refused.statuses == {429: 10} and refused.latencies_s == []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    lost = asyncio.run(_run(hang_up, rate=100.0, duration_s=0.05, connections=5))
    assert lost.sent == 5 and lost.errors == 5 and lost.statuses == {}


def test_answers_that_never_come_are_errors_after_the_timeout() -> None:
    result = asyncio.run(_run(_answering(60.0), rate=100.0, duration_s=0.05, timeout_s=0.2))
    assert result.sent == 5 and result.errors == 5 and result.latencies_s == []


def _echoing(delay_s: float, in_flight: list[int], peak: list[int]) -> Handler:
    """Answers each request with its own body (after ``delay_s``), counting requests in
    flight across connections; a body of ``fail`` gets a 500."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            await asyncio.sleep(delay_s)
            in_flight[0] -= 1
            status = 500 if body == b"fail" else 200
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            writer.write(body)
        writer.close()

    return handle


@pytest.mark.anyio
async def test_closed_loop_keeps_the_concurrency_and_every_answer_in_order() -> None:
    in_flight, peak = [0], [0]
    server = await asyncio.start_server(_echoing(0.01, in_flight, peak), "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        bodies = [b"fail" if i == 7 else f"request {i}".encode() for i in range(40)]
        requests = [encode_request("127.0.0.1", port, "/e", b) for b in bodies]
        result = await run_closed_loop("127.0.0.1", port, requests, concurrency=4)
    assert peak[0] == 4
    assert result.bodies == bodies  # each answer lands at its request's index
    assert result.statuses == [500 if i == 7 else 200 for i in range(40)]
    assert all(latency is not None and latency >= 0.01 for latency in result.latencies_s)
    assert 0.1 <= result.duration_s < 2.0  # 40 requests of 10 ms, 4 at a time


@pytest.mark.anyio
async def test_closed_loop_reports_unanswered_requests() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        requests = [encode_request("127.0.0.1", port, "/e", b"{}") for _ in range(3)]
        result = await run_closed_loop("127.0.0.1", port, requests, 3, timeout_s=2.0)
    assert result.statuses == [None, None, None]
    assert result.latencies_s == [None, None, None]
