"""How ``lmaas bench serve`` sends one streamed POST: the seam and its httpx implementation.

Two clients implement :class:`StreamClient`: :class:`HttpxStreamClient` (the reference, and the
one for ``https``) and :class:`~lmaas.bench.rawclient.RawStreamClient` (the default: a few
times less CPU per request and per streamed token, which on a small machine is CPU the server
under test gets back). Both feed the same :class:`~lmaas.bench.sse.SSEDecoder` and
:class:`~lmaas.bench.sse.StreamTimer`, so they measure the same things.
"""

from __future__ import annotations

from time import perf_counter
from typing import Protocol

import httpx

from lmaas.bench.sse import SSEDecoder, StreamTimer


class StreamFailure(Exception):
    """A request that failed on the wire or with an HTTP error; the message is what the
    outcome records (``HTTP 404: {...}``, ``ConnectError: ...``, ``ReadTimeout: ...``)."""


class StreamClient(Protocol):
    """Sends streamed POSTs to one endpoint of one server, keeping connections alive."""

    async def stream(self, body: bytes, timer: StreamTimer) -> None:
        """POST the JSON ``body`` and feed every SSE event to ``timer`` as it arrives.

        Returns when the response body has ended.

        Raises:
            StreamFailure: a non-200 status, a connection error, a timeout.
            ValueError: from ``timer``: a payload that is not JSON, or an error event.
        """
        ...

    async def aclose(self) -> None:
        """Close every connection."""
        ...


class HttpxStreamClient:
    """One ``httpx.AsyncClient`` with as many keep-alive connections as ``max_connections``."""

    def __init__(
        self, base_url: str, path: str, headers: dict[str, str], timeout_s: float,
        max_connections: int,
    ) -> None:  # fmt: skip
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._path = path
        self._client = httpx.AsyncClient(
            base_url=base_url,
            limits=limits,
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            headers={"Content-Type": "application/json", **headers},
        )

    async def stream(self, body: bytes, timer: StreamTimer) -> None:
        try:
            await self._stream(body, timer)
        except httpx.HTTPError as exc:
            raise StreamFailure(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def _stream(self, body: bytes, timer: StreamTimer) -> None:
        decoder = SSEDecoder()
        async with self._client.stream("POST", self._path, content=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise StreamFailure(f"HTTP {response.status_code}: {text.strip()}")
            async for line in response.aiter_lines():
                now_s = perf_counter()
                for payload in decoder.feed(line):
                    timer.on_payload(payload, now_s)
            for payload in decoder.flush():
                timer.on_payload(payload, perf_counter())

    async def aclose(self) -> None:
        await self._client.aclose()
