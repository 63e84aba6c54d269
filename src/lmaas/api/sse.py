"""Server-sent events: the one place where an error after a stream started is encoded.

Once the 200 and the first event are out, a failure is sent as ONE final ``data: {"error": …}``
event and no ``data: [DONE]``. A client disconnect cancels the stream and closes the event source,
which closes the engine iterator (the engine then aborts the request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmaas.api.context import json_bytes
from lmaas.api.errors import envelope, to_wire

logger = logging.getLogger("lmaas.api")

DONE_EVENT = b"data: [DONE]\n\n"
_T = TypeVar("_T")


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event."""
    return b"data: " + json_bytes(payload) + b"\n\n"


async def aclose_quietly(iterator: object) -> None:
    """Close an async generator even while the caller is being cancelled."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            logger.exception("error while closing a stream")


async def sse_events(
    payloads: AsyncIterator[dict[str, Any]], request_id: str, path: str = "/v1"
) -> AsyncIterator[bytes]:
    """Encode ``payloads`` as SSE, then ``[DONE]``; an error becomes one final error event."""
    try:
        async for payload in payloads:
            yield sse_event(payload)
    except Exception as exc:
        yield sse_event(envelope(path, to_wire(exc, request_id)))
        return
    finally:
        await aclose_quietly(payloads)
    yield DONE_EVENT


class SseResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops when the client goes away.

    Args:
        events: Encoded events (see :func:`sse_events`).
        on_close: Awaited exactly when the response is done, disconnected or not.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            content=events,
            status_code=200,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type=self.media_type,
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
                await self._stream(send)
                group.cancel_scope.cancel()
        except BaseExceptionGroup as errors:
            # One task streams, the other only listens: surface the streamer's error itself.
            raise errors.exceptions[0] from None
        finally:
            await aclose_quietly(self._events)
            if self._on_close is not None:
                with anyio.CancelScope(shield=True):
                    await self._on_close()

    async def _stream(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        try:
            await send(start)
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            logger.info("client went away during a stream")

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return


async def cancel_on_disconnect(receive: Receive, work: Awaitable[_T]) -> _T:
    """Await ``work`` unless the client disconnects first, in which case it is cancelled.

    Raises:
        starlette.requests.ClientDisconnect: the client went away (nothing is sent back).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
