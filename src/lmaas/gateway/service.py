"""Tenants and API keys as a service: what the admin API, the CLI and the auth middleware share.

Keys are checked on every request through a short-lived in-memory cache of key records
(:mod:`lmaas.gateway.key_cache`). A key revoked or rotated through this service stops working at
once; one changed by another process (the CLI, another gateway) within ``key_cache_ttl_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from lmaas.core.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from lmaas.core.types import is_valid_name
from lmaas.gateway.audit import (
    AuditEntry,
    AuditRecord,
    ChainReport,
    alias_move_entry,
    append_audit,
)
from lmaas.gateway.key_cache import KeyCache
from lmaas.gateway.keys import (
    Principal,
    Scope,
    check_model_patterns,
    hash_key,
    key_prefix,
    new_key_id,
    new_secret_key,
    normalize_key_id,
    parse_duration,
    parse_scopes,
)
from lmaas.gateway.limits import Limits
from lmaas.gateway.snapshots import key_view, tenant_view
from lmaas.gateway.store import ApiKey, SqlGovernanceStore, Tenant
from lmaas.registry.lifecycle_db import AliasMove

logger = logging.getLogger("lmaas.gateway")

ADMIN_TENANT = "admin"
"""The tenant of the admin key created on first start."""
SYSTEM_ACTOR = "system"
BOOTSTRAP_ACTOR = "system:bootstrap"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, frozen=True)
class IssuedKey:
    """A key just created or rotated: the only time its secret exists outside the caller."""

    key: ApiKey
    secret: str


class GovernanceService:
    """Create, list, show, rotate and revoke tenants and keys; authenticate requests.

    Args:
        store: Where tenants and key hashes live.
        key_cache_ttl_s: How long a key record read from the DB is trusted (0: never cached).
        clock: Current UTC time (tests pass a fake one).
        actor: Who the audit trail names for changes made without an explicit ``actor``
            (the CLI sets ``cli:<os user>``).
    """

    def __init__(
        self,
        store: SqlGovernanceStore,
        *,
        key_cache_ttl_s: float = 5.0,
        clock: Callable[[], datetime] = _utcnow,
        actor: str = SYSTEM_ACTOR,
    ) -> None:
        self._store = store
        self.actor = actor
        self._clock = clock
        self._keys = KeyCache(store.get_key_for_auth, ttl_s=key_cache_ttl_s, clock=clock)

    @classmethod
    def open(cls, database_url: str, *, key_cache_ttl_s: float = 5.0) -> GovernanceService:
        """A service over the metadata DB at ``database_url`` (migrated on open)."""
        return cls(SqlGovernanceStore(database_url), key_cache_ttl_s=key_cache_ttl_s)

    def close(self) -> None:
        self._store.close()

    def _entry(
        self,
        actor: str | None,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> AuditEntry:
        return AuditEntry(actor or self.actor, action, target, before, after)

    # ---------------------------------------------------------------- audit

    def list_audit(
        self,
        *,
        limit: int = 100,
        after_seq: int | None = None,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
    ) -> list[AuditRecord]:
        """Audit rows, newest first (``after_seq``: only rows after it, oldest first)."""
        if not 1 <= limit <= 10_000:
            raise InvalidRequestError("limit must be between 1 and 10000", param="limit")
        return self._store.list_audit(
            limit=limit,
            after_seq=after_seq,
            actor=actor,
            action=action,
            target=target,
            newest_first=after_seq is None,
        )

    def verify_audit(self) -> ChainReport:
        """Walk the hash chain; the report names the first row edited, deleted or forged."""
        return self._store.verify_audit()

    def record(
        self,
        actor: str | None,
        action: str,
        target: str,
        after: dict[str, Any] | None = None,
        before: dict[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one admin action made outside this service (a job started...)."""
        return self._store.append_audit(self._entry(actor, action, target, before, after))

    def audit_alias_move(self, session: Session, move: AliasMove) -> None:
        """Append a registry alias move to the audit trail inside the move's own transaction
        (the registry's ``alias_audit`` hook), so the move and its row commit together; the
        actor is this service's when the move names none (:func:`alias_move_entry`)."""
        append_audit(session, alias_move_entry(move, self.actor))

    # ---------------------------------------------------------------- tenants

    def create_tenant(
        self,
        name: str,
        description: str = "",
        limits: Limits | None = None,
        weight: float = 1.0,
        *,
        actor: str | None = None,
    ) -> Tenant:
        """Create a tenant, with limits its keys share and its fair-share weight. Raises:
        InvalidRequestError (bad name, limit or weight), ConflictError (taken)."""
        if not is_valid_name(name):
            raise InvalidRequestError(
                f"invalid tenant name {name[:70]!r}: use 1-64 lower-case letters, digits, "
                "'.', '_' or '-', starting with a letter or digit",
                param="name",
            )
        limits = (limits or Limits()).checked()
        tenant = Tenant(name, description[:256], self._clock(), limits, check_weight(weight))
        audit = self._entry(actor, "tenant.create", name, None, tenant_view(tenant))
        self._store.add_tenant(tenant, audit)
        return tenant

    def set_tenant_weight(self, name: str, weight: float, *, actor: str | None = None) -> Tenant:
        """Set a tenant's fair-share weight. Raises: NotFoundError, InvalidRequestError."""
        before = self.get_tenant(name)
        after = replace(before, weight=check_weight(weight))
        audit = self._entry(actor, "tenant.weight", name, tenant_view(before), tenant_view(after))
        tenant = self._store.set_tenant_weight(name, after.weight, audit)
        if tenant is None:
            raise NotFoundError(f"tenant {name[:70]!r} does not exist", param="name")
        self._forget()  # every key of the tenant carries its weight
        return tenant

    def set_tenant_limits(self, name: str, limits: Limits, *, actor: str | None = None) -> Tenant:
        """Replace a tenant's limits (None fields: unlimited). Raises: NotFoundError,
        InvalidRequestError."""
        before = self.get_tenant(name)
        after = replace(before, limits=limits.checked())
        audit = self._entry(actor, "tenant.limits", name, tenant_view(before), tenant_view(after))
        tenant = self._store.set_tenant_limits(name, after.limits, audit)
        if tenant is None:
            raise NotFoundError(f"tenant {name[:70]!r} does not exist", param="name")
        self._forget()  # every key of the tenant carries its limits
        return tenant

    def list_tenants(self) -> list[Tenant]:
        return self._store.list_tenants()

    def get_tenant(self, name: str) -> Tenant:
        """Raises: NotFoundError."""
        tenant = self._store.get_tenant(name)
        if tenant is None:
            raise NotFoundError(f"tenant {name[:70]!r} does not exist", param="name")
        return tenant

    def delete_tenant(self, name: str, *, actor: str | None = None) -> Tenant:
        """Delete a tenant and every key of it.

        Raises:
            NotFoundError: no such tenant.
            ConflictError: it holds the last active admin key (the API would lock itself out).
        """
        tenant = self.get_tenant(name)
        keys = self._store.list_keys(name)
        self._refuse_losing_every_admin({k.id for k in keys})
        before = {**tenant_view(tenant), "keys": [k.id for k in keys]}
        self._store.delete_tenant(name, self._entry(actor, "tenant.delete", name, before, None))
        for key in keys:
            self._forget(key.id)
        return tenant

    # ---------------------------------------------------------------- keys

    def create_key(
        self,
        tenant: str,
        scopes: list[str],
        models: list[str] | None = None,
        *,
        name: str = "",
        expires_in: str | None = None,
        limits: Limits | None = None,
        actor: str | None = None,
    ) -> IssuedKey:
        """Issue a key; its secret is in the result and nowhere else.

        Args:
            tenant: An existing tenant.
            scopes: ``admin``, ``models:read``, ``inference``.
            models: Names or globs of the models the key may see (default: all).
            name: A label for people (``ci``, ``alice-laptop``).
            expires_in: ``30d``, ``12h``...; never expires when None.
            limits: Requests/tokens per minute and concurrency of the key (default: none).

        Raises:
            NotFoundError: no such tenant.
            InvalidRequestError: a bad scope, model pattern, name or duration.
        """
        self.get_tenant(tenant)
        now = self._clock()
        key_id = new_key_id()
        secret = new_secret_key(key_id)
        key = ApiKey(
            id=key_id,
            tenant=tenant,
            name=_check_label(name),
            scopes=parse_scopes(scopes),
            models=check_model_patterns(models if models is not None else ["*"]),
            key_sha256=hash_key(secret),
            created_at=now,
            expires_at=None if expires_in is None else now + parse_duration(expires_in),
            limits=(limits or Limits()).checked(),
        )
        self._store.add_key(
            key, audit=self._entry(actor, "key.create", key.id, None, key_view(key))
        )
        return IssuedKey(key, secret)

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        return self._store.list_keys(tenant)

    def get_key(self, key_id: str) -> ApiKey:
        """``key_id`` as ``<id>`` or ``lmaas-<id>``. Raises: NotFoundError, InvalidRequestError."""
        key = self._store.get_key(normalize_key_id(key_id))
        if key is None:
            raise NotFoundError(f"key {key_prefix(normalize_key_id(key_id))} does not exist")
        return key

    def rotate_key(
        self, key_id: str, *, expires_in: str | None = None, actor: str | None = None
    ) -> IssuedKey:
        """Give a key a new secret; the old one stops working. Same id, scopes and models.

        Args:
            key_id: The key.
            expires_in: A new lifetime from now; the old expiry is kept when None.

        Raises:
            NotFoundError: no such key.
            ConflictError: the key is revoked.
            InvalidRequestError: the key expired and no new lifetime was given.
        """
        key = self.get_key(key_id)
        now = self._clock()
        status = key.status(now)
        if status == "revoked":
            raise ConflictError(f"key {key.prefix} is revoked; create a new key instead")
        expires_at = key.expires_at if expires_in is None else now + parse_duration(expires_in)
        if expires_at is not None and expires_at <= now:
            raise InvalidRequestError(
                f"key {key.prefix} expired; rotate it with a new expires_in", param="expires_in"
            )
        secret = new_secret_key(key.id)
        after = replace(key, rotated_at=now, expires_at=expires_at)
        audit = self._entry(actor, "key.rotate", key.id, key_view(key), key_view(after))
        rotated = self._store.replace_hash(key.id, hash_key(secret), now, expires_at, audit)
        self._forget(key.id)
        if rotated is None:  # deleted in between
            raise NotFoundError(f"key {key.prefix} does not exist")
        return IssuedKey(rotated, secret)

    def set_key_limits(self, key_id: str, limits: Limits, *, actor: str | None = None) -> ApiKey:
        """Replace a key's limits (None fields: unlimited). Raises: NotFoundError,
        InvalidRequestError."""
        key = self.get_key(key_id)
        after = replace(key, limits=limits.checked())
        audit = self._entry(actor, "key.limits", key.id, key_view(key), key_view(after))
        updated = self._store.set_key_limits(key.id, after.limits, audit)
        self._forget(key.id)
        if updated is None:
            raise NotFoundError(f"key {key.prefix} does not exist")
        return updated

    def revoke_key(self, key_id: str, *, actor: str | None = None) -> ApiKey:
        """Revoke a key for good (the row stays, for the record); revoking twice is a no-op.

        Raises:
            NotFoundError: no such key.
            ConflictError: it is the last active admin key.
        """
        key = self.get_key(key_id)
        if key.revoked_at is not None:
            return key
        self._refuse_losing_every_admin({key.id})
        now = self._clock()
        after = replace(key, revoked_at=now)
        audit = self._entry(actor, "key.revoke", key.id, key_view(key), key_view(after))
        revoked = self._store.revoke(key.id, now, audit)
        self._forget(key.id)
        return revoked or key

    def bootstrap_admin_key(self) -> IssuedKey | None:
        """On an install without any admin key, create one (in tenant ``admin``).

        Revoked and expired admin keys count: a lost admin key is replaced on purpose, from the
        host (``lmaas keys create --tenant admin --scope admin``), never by a restart.

        Returns:
            The new key, whose secret the caller prints once; None when an admin key exists
            (also when another process won the race to create the tenant).
        """
        if any(Scope.ADMIN in key.scopes for key in self._store.list_keys()):
            return None
        now = self._clock()
        key_id = new_key_id()
        secret = new_secret_key(key_id)
        key = ApiKey(
            id=key_id,
            tenant=ADMIN_TENANT,
            name="bootstrap",
            scopes=frozenset({Scope.ADMIN}),
            models=("*",),
            key_sha256=hash_key(secret),
            created_at=now,
        )
        missing = self._store.get_tenant(ADMIN_TENANT) is None
        tenant = Tenant(ADMIN_TENANT, "created on first start", now) if missing else None
        audit = AuditEntry(BOOTSTRAP_ACTOR, "key.create", key.id, None, key_view(key))
        try:
            self._store.add_key(key, with_tenant=tenant, audit=audit)
        except ConflictError:
            return None
        return IssuedKey(key, secret)

    def _refuse_losing_every_admin(self, removed_ids: set[str]) -> None:
        now = self._clock()
        admins = [
            k
            for k in self._store.list_keys()
            if Scope.ADMIN in k.scopes and k.status(now) == "active"
        ]
        if admins and all(k.id in removed_ids for k in admins):
            raise ConflictError(
                "this would remove the last active admin key; create another admin key first "
                "(lmaas keys create --tenant admin --scope admin)"
            )

    # ---------------------------------------------------------------- authentication

    async def authenticate(self, secret: str) -> Principal:
        """The principal of a presented key (see :class:`~lmaas.gateway.key_cache.KeyCache`).

        Raises:
            AuthenticationError: malformed, unknown, wrong, revoked or expired key.
        """
        return await self._keys.authenticate(secret)

    def authenticate_sync(self, secret: str) -> Principal:
        """:meth:`authenticate` without the cache, for callers outside an event loop."""
        return self._keys.authenticate_sync(secret)

    def _forget(self, key_id: str | None = None) -> None:
        """Drop cached key records (one, or all) after a change made through this service."""
        self._keys.forget(key_id)


MAX_WEIGHT = 1000.0


def check_weight(weight: float) -> float:
    """Raises: InvalidRequestError for a weight outside (0, 1000]."""
    if not (0 < weight <= MAX_WEIGHT) or weight != weight:
        raise InvalidRequestError(
            f"weight must be above 0 and at most {MAX_WEIGHT:g}, not {weight}", param="weight"
        )
    return float(weight)


def _check_label(name: str) -> str:
    if len(name) > 64 or any(not c.isprintable() for c in name):
        raise InvalidRequestError("a key name is at most 64 printable characters", param="name")
    return name
