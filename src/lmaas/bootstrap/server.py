"""Run the gateway under uvicorn with draining on SIGTERM/SIGINT."""

from __future__ import annotations

import socket
import types
from collections.abc import Callable

import uvicorn

from lmaas.bootstrap.settings import Settings
from lmaas.bootstrap.wiring import Gateway


class DrainingServer(uvicorn.Server):
    """A uvicorn server that flips the engine to draining before it stops accepting work.

    On the first signal readiness turns false and new inference requests get 503; uvicorn then
    waits up to ``timeout_graceful_shutdown`` for in-flight requests before the lifespan stops
    the workers.
    """

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_drain = on_drain

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        self._on_drain()
        super().handle_exit(sig, frame)


def run_gateway(gateway: Gateway, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve until a signal; ``sock`` lets a caller bind first (port 0 → the chosen port)."""
    config = uvicorn.Config(
        gateway.app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) or None,
        timeout_keep_alive=5,
        limit_concurrency=4096,
        access_log=False,
    )
    server = DrainingServer(config, gateway.engine.begin_draining)
    server.run(sockets=[sock] if sock is not None else None)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn.

    Made with ``IPPROTO_TCP`` explicitly: asyncio turns Nagle off (``TCP_NODELAY``) only on
    accepted sockets whose ``proto`` says TCP, and they inherit it from this one. With ``proto``
    0, a response written as head then body waited for the client's delayed ACK: ~40 ms added
    to most requests at a few hundred requests per second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
