"""The lean Redis client: RESP encoding and parsing, URLs, and behaviour against the real Redis
(127.0.0.1:6379; those tests skip without it) and against small scripted TCP servers for the
failures a real Redis does not produce on demand (silence, garbage, a dropped connection)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from lmaas.gateway.resp import (
    RedisAddress,
    RedisConnectionError,
    RedisReplyError,
    RespClient,
    Script,
    _encode_slowly,
    _Incomplete,
    encode_command,
    parse_reply,
)

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"


# -- encoding and parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["PING"],
        ["EVALSHA", "a" * 40, 2, "k:1", "k:2", 20, "lease-1", 1.5, -3, "0.25"],
        ["SET", "ключ", "значение"],  # non-ASCII: byte lengths, not characters
        ["SET", b"\x00\xff\r\n", ""],
    ],
)
def test_commands_encode_as_resp_arrays_of_bulk_strings(args: list[Any]) -> None:
    assert encode_command(args) == _encode_slowly(args)
    assert encode_command(["SET", "k", 7]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n"
    assert encode_command(["SET", "é"]) == b"*2\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n"


def test_a_bool_is_not_a_redis_argument() -> None:
    with pytest.raises(TypeError, match="bool"):
        encode_command(["SET", "k", True])


REPLIES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", "OK"),
    (b":-12\r\n", -12),
    (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n+x\r\n", [1, [b"a", None], "x"]),
]


@pytest.mark.parametrize(("data", "value"), REPLIES)
def test_replies_parse_whole_and_never_from_a_partial_buffer(data: bytes, value: Any) -> None:
    assert parse_reply(data + b":9\r\n", 0) == (value, len(data))
    for cut in range(len(data)):
        assert isinstance(parse_reply(data[:cut], 0), _Incomplete)


def test_error_replies_are_values_for_the_caller_to_raise() -> None:
    parsed = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)
    assert not isinstance(parsed, _Incomplete)
    error, end = parsed
    assert isinstance(error, RedisReplyError) and str(error).startswith("NOSCRIPT")
    assert end == 30


@pytest.mark.parametrize("data", [b"?what\r\n", b":abc\r\n", b"$x\r\n"])
def test_bytes_that_are_not_resp_break_the_connection(data: bytes) -> None:
    with pytest.raises(RedisConnectionError, match="not RESP"):
        parse_reply(data, 0)


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", RedisAddress()),
        ("redis://cache.internal", RedisAddress(host="cache.internal")),
        ("redis://:s%40cret@h:7000/3", RedisAddress(host="h", port=7000, db=3, password="s@cret")),
        ("redis://bob:pw@h/1", RedisAddress(host="h", db=1, username="bob", password="pw")),
        ("rediss://h:6380", RedisAddress(host="h", port=6380, tls=True)),
        ("unix:///run/redis.sock?db=2", RedisAddress(path="/run/redis.sock", db=2)),
    ],
)
def test_redis_urls(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:6379", "starts with redis://"),
        ("redis://h:port/0", "bad port or database"),
        ("redis://h/zero", "bad port or database"),
        ("redis://h/-1", "0 or more"),
    ],
)
def test_bad_redis_urls_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisAddress.parse(url)


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RespClient(RedisAddress(), timeout_s=0)


# -- the real Redis ---------------------------------------------------------------------------


@pytest.fixture
async def redis_client() -> AsyncIterator[RespClient]:
    client = RespClient.from_url(REDIS_URL, timeout_s=5.0, connect_timeout_s=2.0)
    try:
        await client.execute("PING")
    except RedisConnectionError as exc:
        await client.aclose()
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {exc}")
    yield client
    await client.aclose()


async def test_commands_and_concurrent_pipelining(redis_client: RespClient) -> None:
    key = f"lmaas-test:resp:{uuid.uuid4().hex}"
    try:
        assert await redis_client.execute("SET", key, "0") == "OK"
        replies = await asyncio.gather(*(redis_client.execute("INCR", key) for _ in range(300)))
        assert sorted(replies) == list(range(1, 301))
        assert replies == list(range(1, 301))  # one connection: replies come in send order
        with pytest.raises(RedisReplyError, match="WRONGTYPE"):
            await redis_client.execute("LPUSH", key, "x")
        assert await redis_client.execute("GET", key) == b"300"  # the connection survived
    finally:
        await redis_client.execute("DEL", key)


async def test_a_script_redis_does_not_know_is_loaded_then_run(redis_client: RespClient) -> None:
    script = Script(f"-- {uuid.uuid4().hex}\nreturn {{tonumber(ARGV[1]) + 1, KEYS[1]}}")
    assert await redis_client.run_script(script, ["k"], [41]) == [42, b"k"]
    assert await redis_client.run_script(script, ["k"], [1]) == [2, b"k"]  # by SHA now
    later = Script(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")
    assert await redis_client.run_script_nowait(later, [], ["late"]) == b"late"


async def test_nowait_commands_ride_with_the_next_command_or_go_out_alone(
    redis_client: RespClient,
) -> None:
    key = f"lmaas-test:resp:{uuid.uuid4().hex}"
    incr = Script("return redis.call('INCR', KEYS[1])")
    await redis_client.run_script(incr, [key], [])  # loaded, connection open
    try:
        first = redis_client.run_script_nowait(incr, [key], [])
        second = redis_client.run_script_nowait(incr, [key], [])
        assert await redis_client.execute("GET", key) == b"3"  # written before the GET
        assert (first.result(), second.result()) == (2, 3)
        alone = redis_client.run_script_nowait(incr, [key], [])
        assert await asyncio.wait_for(alone, 1.0) == 4  # flushed after defer_s
    finally:
        await redis_client.execute("DEL", key)


async def test_a_killed_connection_fails_in_flight_commands_then_reconnects(
    redis_client: RespClient,
) -> None:
    own_id = await redis_client.execute("CLIENT", "ID")
    blocked = asyncio.ensure_future(redis_client.execute("BLPOP", uuid.uuid4().hex, 5))
    await asyncio.sleep(0.05)
    other = RespClient.from_url(REDIS_URL)
    try:
        assert await other.execute("CLIENT", "KILL", "ID", own_id) == 1
    finally:
        await other.aclose()
    with pytest.raises(RedisConnectionError, match=r"closed the connection|lost"):
        await asyncio.wait_for(blocked, 2.0)
    assert await redis_client.execute("PING") == "PONG"  # the next command reconnects
    assert await redis_client.execute("CLIENT", "ID") != own_id


async def test_an_unreachable_redis_is_a_connection_error() -> None:
    client = RespClient.from_url("redis://127.0.0.1:1/0", connect_timeout_s=1.0)
    try:
        with pytest.raises(
            RedisConnectionError, match=r"cannot connect to Redis at 127\.0\.0\.1:1"
        ):
            await client.execute("PING")
    finally:
        await client.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.execute("PING")


# -- scripted servers -------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes]:
    count = int((await reader.readline())[1:])
    args = []
    for _ in range(count):
        size = int((await reader.readline())[1:])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


async def test_login_sends_auth_and_select_first(scripted: Any) -> None:
    seen: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            seen.append(await _read_command(reader))
            writer.write(b"+OK\r\n" if len(seen) < 3 else b"+PONG\r\n")

    port = await scripted(handler)
    client = RespClient.from_url(f"redis://bob:pw@127.0.0.1:{port}/4")
    try:
        assert await client.execute("PING") == "PONG"
    finally:
        await client.aclose()
    assert seen == [[b"AUTH", b"bob", b"pw"], [b"SELECT", b"4"], [b"PING"]]


async def test_a_refused_login_is_a_connection_error(scripted: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_command(reader)
        writer.write(b"-WRONGPASS invalid username-password pair\r\n")

    port = await scripted(handler)
    client = RespClient.from_url(f"redis://:bad@127.0.0.1:{port}")
    try:
        with pytest.raises(RedisConnectionError, match="refused the login: WRONGPASS"):
            await client.execute("PING")
    finally:
        await client.aclose()


async def test_silence_times_out_and_drops_the_connection(scripted: Any) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        command = await _read_command(reader)
        if connections > 1:  # the second connection answers
            writer.write(b"+PONG\r\n" if command == [b"PING"] else b"-ERR\r\n")
            await writer.drain()
        await reader.read()

    port = await scripted(handler)
    client = RespClient.from_url(f"redis://127.0.0.1:{port}", timeout_s=0.2)
    try:
        results = await asyncio.gather(
            client.execute("PING"), client.execute("PING"), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results)
        assert "did not answer within 0.2 s" in str(results[0])
        assert await client.execute("PING") == "PONG"
    finally:
        await client.aclose()
    assert connections == 2


async def test_garbage_or_a_closed_socket_fail_the_commands_in_flight(scripted: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_command(reader)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_command(reader)
        writer.close()

    for handler, message in ((garbage, "not RESP"), (hang_up, r"closed the connection|lost")):
        client = RespClient.from_url(f"redis://127.0.0.1:{await scripted(handler)}")
        try:
            with pytest.raises(RedisConnectionError, match=message):
                await client.execute("PING")
        finally:
            await client.aclose()


async def test_a_cancelled_command_leaves_the_replies_in_step(scripted: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in (b":1\r\n", b":2\r\n"):
            await _read_command(reader)
            await asyncio.sleep(0.1)
            writer.write(reply)
        await reader.read()

    client = RespClient.from_url(f"redis://127.0.0.1:{await scripted(handler)}")
    try:
        first = asyncio.ensure_future(client.execute("GET", "a"))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(client.execute("GET", "b"))
        await asyncio.sleep(0.02)
        first.cancel()
        assert await second == 2  # not the cancelled command's reply
    finally:
        await client.aclose()
