"""The metering middleware: one usage record per request that reached the engine.

It runs inside authentication (the principal is known) and gives each request a
:class:`~lmaas.gateway.usage.RequestUsage`, which the request's engine view
(:func:`lmaas.api.services.services_of` wraps the engine in a
:class:`~lmaas.gateway.usage.MeteredEngineClient`) fills with the worker's counts. When the
response is over (the last byte of a stream sent, or the client gone), a request that engaged
the engine becomes a :class:`~lmaas.gateway.usage_store.UsageRecord` in the meter's buffer: an
append, no I/O, on the request path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmaas.api.context import START_TIME_KEY, principal_of, request_id_of
from lmaas.api.middleware import route_template
from lmaas.api.services import USAGE_KEY
from lmaas.gateway.usage import RequestUsage, UsageMeter
from lmaas.gateway.usage_store import UsageRecord

CLIENT_CLOSED_STATUS = 499
"""Status metered for a request whose client went away before any response (nginx's 499)."""


def request_usage_of(scope: MutableMapping[str, Any]) -> RequestUsage | None:
    """The usage accumulator of this request; None when the server does not meter."""
    usage = scope.get(USAGE_KEY)
    return usage if isinstance(usage, RequestUsage) else None


class MeteringMiddleware:
    """See the module docstring.

    Args:
        app: The wrapped ASGI app (the router).
        meter: Where records go.
    """

    def __init__(self, app: ASGIApp, meter: UsageMeter) -> None:
        self.app = app
        self.meter = meter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        usage = RequestUsage()
        scope[USAGE_KEY] = usage
        start = scope.get(START_TIME_KEY)
        if not isinstance(start, float):
            start = time.perf_counter()
        status = 0
        cancelled = False

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except (asyncio.CancelledError, ClientDisconnect, OSError):
            cancelled = True
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            if usage.engaged:
                self._record(scope, usage, status, cancelled, start)

    def _record(
        self, scope: Scope, usage: RequestUsage, status: int, cancelled: bool, start: float
    ) -> None:
        principal = principal_of(scope)
        cancelled = cancelled or usage.cut_short or usage.streams_open > 0
        self.meter.record(
            UsageRecord(
                request_id=request_id_of(scope),
                model=usage.model,
                status=status or (CLIENT_CLOSED_STATUS if cancelled else 500),
                tenant=principal.tenant if principal is not None else None,
                key_id=principal.key_id if principal is not None else None,
                version=usage.version,
                task=usage.task,
                route=route_template(scope),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                embedding_tokens=usage.embedding_tokens,
                audio_seconds=usage.audio_seconds,
                images=usage.images,
                latency_ms=(time.perf_counter() - start) * 1000.0,
                cancelled=cancelled,
            )
        )
