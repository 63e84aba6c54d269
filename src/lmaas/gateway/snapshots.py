"""Tenants and keys as the audit trail records them (the before/after of each admin change):
plain JSON values, never a secret nor a key's hash."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lmaas.gateway.limits import Limits
from lmaas.gateway.store import ApiKey, Tenant


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _limits_view(limits: Limits) -> dict[str, Any]:
    view: dict[str, Any] = {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "max_concurrent": limits.max_concurrent,
    }
    if limits.quotas:
        view["quotas"] = [q.as_dict() for q in limits.quotas]
    return view


def tenant_view(tenant: Tenant) -> dict[str, Any]:
    """A tenant as the audit trail records it."""
    return {
        "name": tenant.name,
        "description": tenant.description,
        "created_at": _iso(tenant.created_at),
        "limits": _limits_view(tenant.limits),
        "weight": tenant.weight,
    }


def key_view(key: ApiKey) -> dict[str, Any]:
    """A key as the audit trail records it: never the secret, nor its hash."""
    return {
        "id": key.id,
        "tenant": key.tenant,
        "name": key.name,
        "scopes": sorted(s.value for s in key.scopes),
        "models": list(key.models),
        "created_at": _iso(key.created_at),
        "expires_at": _iso(key.expires_at),
        "revoked_at": _iso(key.revoked_at),
        "rotated_at": _iso(key.rotated_at),
        "limits": _limits_view(key.limits),
    }
