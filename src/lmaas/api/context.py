"""Per-request values the middleware and handlers share through the ASGI scope (no globals)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import MutableMapping
from typing import Any

from starlette.responses import Response

from lmaas.gateway.keys import Principal

REQUEST_ID_KEY = "lmaas.request_id"
MODEL_LABEL_KEY = "lmaas.model"
START_TIME_KEY = "lmaas.start_time"

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    """A fresh request id, ``req-<32 hex>``."""
    return f"req-{uuid.uuid4().hex}"


def sane_request_id(value: str | None) -> str:
    """``value`` when a client sent a short id of safe characters, else a fresh one."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def request_id_of(scope: MutableMapping[str, Any]) -> str:
    """The id the middleware gave this request (or a fresh one outside the middleware)."""
    rid = scope.get(REQUEST_ID_KEY)
    if not isinstance(rid, str):
        rid = new_request_id()
        scope[REQUEST_ID_KEY] = rid
    return rid


def set_model_label(scope: MutableMapping[str, Any], model: str) -> None:
    """Label this request's metrics with ``model`` (only for models that exist: bounded labels)."""
    scope[MODEL_LABEL_KEY] = model


def set_principal(scope: MutableMapping[str, Any], principal: Principal) -> None:
    """Record who this request runs as, where handlers read it: ``request.state.principal``."""
    scope.setdefault("state", {})["principal"] = principal


def principal_of(scope: MutableMapping[str, Any]) -> Principal | None:
    """The authenticated principal of this request; None when the server runs without auth."""
    state = scope.get("state")
    principal = state.get("principal") if isinstance(state, dict) else None
    return principal if isinstance(principal, Principal) else None


def json_bytes(payload: object) -> bytes:
    """Compact UTF-8 JSON; strings with lone surrogates fall back to ASCII escapes."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")


class JsonResponse(Response):
    """A JSON response encoded with :func:`json_bytes` (NaN refused, surrogates survive)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json_bytes(content)
