"""Pure ASGI middleware (streams pass through untouched): request id, body cap, metrics, 500s."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmaas.api.context import MODEL_LABEL_KEY, REQUEST_ID_KEY, START_TIME_KEY, sane_request_id
from lmaas.api.errors import render_raw, to_wire
from lmaas.core.errors import InvalidRequestError, PayloadTooLargeError
from lmaas.engine.routing import track_routed
from lmaas.observability.metrics import Metrics

logger = logging.getLogger("lmaas.api")

MODEL_VERSION_HEADER = b"x-lmaas-model-version"
"""Which version of the model served the request (a deployment may route to several)."""


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", []) if k.lower() == name]


def route_template(scope: Scope) -> str:
    """The matched route's path template (bounded metric label), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class _Replay:
    """A receive callable that hands out a buffered body once, then the real receive."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()


async def capped_receive(scope: Scope, receive: Receive, max_body_bytes: int) -> Receive:
    """``receive`` for the app, once the body is known to fit under the cap.

    Raises:
        PayloadTooLargeError: the declared or streamed body is over the cap (declared: unread).
        InvalidRequestError: the Content-Length header is not a non-negative integer.
    """
    too_large = f"request body is larger than the limit of {max_body_bytes} bytes"
    lengths = _header(scope, b"content-length")
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise InvalidRequestError("invalid Content-Length header")
        if int(lengths[0]) > max_body_bytes:
            raise PayloadTooLargeError(too_large)
        return receive
    if not any(b"chunked" in v.lower() for v in _header(scope, b"transfer-encoding")):
        return receive
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > max_body_bytes:
            raise PayloadTooLargeError(too_large)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return _Replay(b"".join(chunks), receive)


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-Id``), caps its body, counts it, and turns an
    uncaught exception into a 500 in the route's envelope (never a traceback).

    Args:
        app: The wrapped ASGI app.
        metrics: Where request counts and latencies go.
        max_body_bytes: Body cap, checked before the app reads anything.
        body_caps: Caps of particular paths instead of ``max_body_bytes`` (file uploads).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        body_caps: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_caps = dict(body_caps or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = sane_request_id(given[0].decode("latin-1") if given else None)
        scope[REQUEST_ID_KEY] = rid
        start = scope[START_TIME_KEY] = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "started": False}
        routed = track_routed()  # the engine notes which model version serves the request

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                if routed.version is not None:
                    headers.append((MODEL_VERSION_HEADER, routed.version.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            cap = self.body_caps.get(scope.get("path", ""), self.max_body_bytes)
            app_receive = await capped_receive(scope, receive, cap)
            await self.app(scope, app_receive, send_with_id)
        except ClientDisconnect:
            state["status"] = 499
        except Exception as exc:
            if state["started"]:
                logger.error("error after the response started (request id %s)", rid, exc_info=exc)
            else:
                await self._send_error(scope, send_with_id, exc, rid)
        finally:
            model = scope.get(MODEL_LABEL_KEY, "")
            elapsed = time.perf_counter() - start
            self.metrics.observe_http(route_template(scope), model, state["status"], elapsed)

    @staticmethod
    async def _send_error(scope: Scope, send: Send, exc: Exception, rid: str) -> None:
        status, headers, body = render_raw(scope.get("path", ""), to_wire(exc, rid))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
