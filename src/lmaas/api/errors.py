"""The one table from :class:`LmaasError` to HTTP, and the two error envelopes.

OpenAI routes (everything not under ``/v2``) answer ``{"error": {"message", "type", "param",
"code"}}``; Open Inference Protocol v2 routes answer ``{"error": "..."}``. A bug answers 500 with a
generic message and the request id; the traceback goes to the log only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse, json_bytes, request_id_of
from lmaas.core import errors as e

logger = logging.getLogger("lmaas.api")

_TABLE: dict[type[e.LmaasError], tuple[int, str]] = {
    e.InvalidRequestError: (400, "invalid_request_error"),
    e.PayloadTooLargeError: (413, "invalid_request_error"),
    e.AuthenticationError: (401, "authentication_error"),
    e.PermissionDeniedError: (403, "permission_error"),
    e.NotFoundError: (404, "not_found_error"),
    e.ConflictError: (409, "conflict_error"),
    e.RateLimitError: (429, "rate_limit_error"),
    e.QuotaExceededError: (429, "rate_limit_error"),  # code quota_exceeded: SDKs still retry
    e.NotSupportedError: (501, "not_supported_error"),
    e.ServiceUnavailableError: (503, "service_unavailable_error"),
    e.ModelLoadError: (503, "service_unavailable_error"),
    e.OfflineError: (503, "service_unavailable_error"),
    e.DeadlineExceededError: (504, "timeout_error"),
    e.InternalError: (500, "server_error"),
}
"""Looked up along the class's MRO, so subclasses inherit their parent's row."""

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_supported_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


@dataclass(slots=True, frozen=True)
class WireError:
    """One error as the wire sees it, before it is put in an envelope."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None


def is_v2_path(path: str) -> bool:
    """True for Open Inference Protocol v2 routes, which use the flat ``{"error": "..."}``."""
    return path == "/v2" or path.startswith("/v2/")


def status_of(error: e.LmaasError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of a domain error."""
    for cls in type(error).__mro__:
        row = _TABLE.get(cls)
        if row is not None:
            return row
    return 500, "server_error"


def to_wire(error: BaseException, request_id: str) -> WireError:
    """Map any exception to what the client may see; bugs are logged here with the request id."""
    if isinstance(error, e.LmaasError) and not isinstance(error, e.InternalError):
        status, type_ = status_of(error)
        retry = getattr(error, "retry_after_s", None)
        return WireError(status, error.message, type_, error.param, error.code, retry)
    logger.error("internal error (request id %s)", request_id, exc_info=error)
    return WireError(500, f"internal error (request id {request_id})", "server_error", None, None)


def envelope(path: str, err: WireError) -> dict[str, Any]:
    """The error body for the route family of ``path``."""
    if is_v2_path(path):
        return {"error": err.message}
    body = {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    return {"error": body}


def error_headers(err: WireError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for retryable statuses."""
    if err.status in (429, 503):
        return {"Retry-After": str(max(1, math.ceil(err.retry_after_s or 1.0)))}
    return {}


def render_raw(path: str, err: WireError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, raw headers, body) for middleware that answers without a Response object."""
    body = json_bytes(envelope(path, err))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(err).items()]
    return err.status, headers, body


def error_response(request: Request, error: BaseException) -> Response:
    """The full HTTP response for ``error`` on the route of ``request``."""
    err = to_wire(error, request_id_of(request.scope))
    return JsonResponse(
        envelope(request.url.path, err), status_code=err.status, headers=error_headers(err)
    )


def _validation_message(exc: RequestValidationError) -> WireError:
    first = next(iter(exc.errors()), None)
    if first is None:
        return WireError(400, "invalid request", "invalid_request_error")
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return WireError(400, f"malformed JSON body: {reason}", "invalid_request_error")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (Content-Type: application/json)"
        return WireError(400, message, "invalid_request_error")
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    text = f"invalid value for '{param}': {msg}" if param else msg
    return WireError(400, text, "invalid_request_error", param, "invalid_value")


async def _on_lmaas_error(request: Request, exc: Exception) -> Response:
    return error_response(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err = _validation_message(exc)
    return JsonResponse(envelope(request.url.path, err), status_code=400)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"not found: {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    err = WireError(status, message, _TYPE_BY_STATUS.get(status, "server_error"))
    headers = dict(exc.headers or {})
    headers.update(error_headers(err))
    return JsonResponse(envelope(request.url.path, err), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route domain errors, validation errors and HTTP errors through the envelopes.

    Bare exceptions are caught by :class:`lmaas.api.middleware.RequestContextMiddleware`, which
    answers 500 without re-raising (Starlette's own 500 handler re-raises into the server).
    """
    app.add_exception_handler(e.LmaasError, _on_lmaas_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
