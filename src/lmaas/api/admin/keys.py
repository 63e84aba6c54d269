"""``/admin/keys``: create (the secret is returned once), list, show, rotate and revoke API keys
(admin scope, checked by the auth middleware for the whole ``/admin`` prefix)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.requests import Request

from lmaas.api.admin.schemas import (
    IssuedKeyResponse,
    KeyCreateRequest,
    KeyListResponse,
    KeyResponse,
    KeyRotateRequest,
    LimitsBody,
)
from lmaas.api.services import actor_of, governance_of

router = APIRouter(prefix="/admin/keys", tags=["admin"])


def _now() -> datetime:
    return datetime.now(UTC)


@router.post("", status_code=201)
def create_key(body: KeyCreateRequest, request: Request) -> IssuedKeyResponse:
    """Issue a key for a tenant; ``secret`` is in this response only (the DB keeps its hash)."""
    issued = governance_of(request).create_key(
        body.tenant,
        body.scopes,
        body.models,
        name=body.name,
        expires_in=body.expires_in,
        limits=body.limits.to_limits(),
        actor=actor_of(request),
    )
    return IssuedKeyResponse.issued(issued, _now())


@router.get("")
def list_keys(request: Request, tenant: str | None = None) -> KeyListResponse:
    """Every key (of ``tenant`` when given), without secrets."""
    keys = governance_of(request).list_keys(tenant)
    now = _now()
    return KeyListResponse(data=[KeyResponse.of(k, now) for k in keys])


@router.get("/{key_id}")
def get_key(key_id: str, request: Request) -> KeyResponse:
    """One key by id (``<id>`` or ``lmaas-<id>``); 404 when unknown."""
    return KeyResponse.of(governance_of(request).get_key(key_id), _now())


@router.post("/{key_id}/rotate")
def rotate_key(
    key_id: str, request: Request, body: KeyRotateRequest | None = None
) -> IssuedKeyResponse:
    """A new secret for the same key (id, scopes, models); the old secret stops working."""
    expires_in = body.expires_in if body is not None else None
    issued = governance_of(request).rotate_key(
        key_id, expires_in=expires_in, actor=actor_of(request)
    )
    return IssuedKeyResponse.issued(issued, _now())


@router.put("/{key_id}/limits")
def set_key_limits(key_id: str, body: LimitsBody, request: Request) -> KeyResponse:
    """Replace the key's limits (absent or null fields: unlimited)."""
    governance = governance_of(request)
    key = governance.set_key_limits(key_id, body.to_limits(), actor=actor_of(request))
    return KeyResponse.of(key, _now())


@router.post("/{key_id}/revoke")
@router.delete("/{key_id}")
def revoke_key(key_id: str, request: Request) -> KeyResponse:
    """Revoke a key for good (its record stays); 409 for the last active admin key."""
    key = governance_of(request).revoke_key(key_id, actor=actor_of(request))
    return KeyResponse.of(key, _now())
