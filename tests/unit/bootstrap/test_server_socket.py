"""The gateway's listening socket: connections accepted on it must not run Nagle."""

from __future__ import annotations

import asyncio
import socket

from lmaas.bootstrap.server import bind_socket


async def _accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY of a connection asyncio accepted on ``sock`` (as uvicorn does)."""
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = writer.get_extra_info("socket")
        seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_client, sock=sock)
    async with server:
        host, port = sock.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        value = await asyncio.wait_for(seen, 5)
        writer.close()
    return value


def test_accepted_connections_have_nagle_off() -> None:
    # With proto 0 asyncio leaves Nagle on: a response's head and body then wait ~40 ms for
    # the client's delayed ACK under load.
    sock = bind_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    assert asyncio.run(_accepted_nodelay(sock)) != 0
