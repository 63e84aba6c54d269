"""``/admin/audit``: the hash-chained audit trail of admin actions, and its verification
(admin scope, checked by the auth middleware for the whole ``/admin`` prefix)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse
from lmaas.api.services import governance_of

router = APIRouter(prefix="/admin/audit", tags=["admin"])


@router.get("")
def list_audit(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    after_seq: Annotated[
        int | None, Query(description="only rows after this one, oldest first")
    ] = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
) -> Response:
    """Audit rows, newest first (with ``after_seq``: the rows after it, oldest first)."""
    rows = governance_of(request).list_audit(
        limit=limit, after_seq=after_seq, actor=actor, action=action, target=target
    )
    body: dict[str, Any] = {"object": "list", "data": [r.to_dict() for r in rows]}
    return JsonResponse(body)


@router.get("/verify")
def verify_audit(request: Request) -> Response:
    """Walk the hash chain: ``{"ok", "rows", "first_broken_seq", "reason"}`` (200 either way)."""
    return JsonResponse(governance_of(request).verify_audit().to_dict())
