"""Tenants and API keys in the metadata DB (SQLAlchemy 2; schema by the registry's Alembic chain).

The store keeps records, never secrets: a key row holds ``sha256(key)`` only. It shares the DB
(and the migrations: ``0002``; the tenant weight, ``0003_gov3``; quotas, ``0004_quotas``) with
the model registry, so one ``LMAAS_DATABASE_URL`` (SQLite by default, PostgreSQL in
production) holds all of lmaas's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lmaas.core.errors import ConflictError
from lmaas.gateway.audit import AuditEntry, AuditRecord, ChainReport, append_audit, list_audit
from lmaas.gateway.audit import verify_chain as _verify_chain
from lmaas.gateway.keys import Principal, Scope, key_prefix
from lmaas.gateway.limits import NO_LIMITS, Limits
from lmaas.gateway.quotas import make_quota
from lmaas.registry.metadata import open_migrated_engine

KeyStatus = Literal["active", "revoked", "expired"]


class _Base(DeclarativeBase):
    """Declarative base of the governance tables (created by migration 0002)."""


class _LimitColumns:
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    quotas: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    """Quotas per day or month (migration 0004_quotas): ``[{"metric", "limit", "period"}]``."""

    @property
    def limits(self) -> Limits:
        quotas = tuple(
            make_quota(str(q["metric"]), float(q["limit"]), str(q["period"]))
            for q in self.quotas or ()
        )
        return Limits(self.rpm_limit, self.tpm_limit, self.max_concurrent, quotas)


def _limit_values(limits: Limits) -> dict[str, Any]:
    return {
        "rpm_limit": limits.rpm,
        "tpm_limit": limits.tpm,
        "max_concurrent": limits.max_concurrent,
        "quotas": [q.as_dict() for q in limits.quotas] or None,
    }


class TenantRow(_LimitColumns, _Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    """Fair-share weight (migration 0003_gov3)."""


class ApiKeyRow(_LimitColumns, _Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(
        String(64), ForeignKey("tenants.name", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64), default="")
    key_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    models: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def _audit(session: Session, entry: AuditEntry | None) -> None:
    if entry is not None:
        append_audit(session, entry)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written as UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


@dataclass(slots=True, frozen=True)
class Tenant:
    """A team that owns API keys."""

    name: str
    description: str
    created_at: datetime
    limits: Limits = NO_LIMITS
    """Shared by all the tenant's keys."""
    weight: float = 1.0
    """Fair share: under contention the engine queues serve tenants in proportion to it."""


@dataclass(slots=True, frozen=True)
class ApiKey:
    """An API key's record: everything but the secret (which only its hash stands for)."""

    id: str
    tenant: str
    name: str
    scopes: frozenset[Scope]
    models: tuple[str, ...]
    key_sha256: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    rotated_at: datetime | None = None
    limits: Limits = NO_LIMITS

    @property
    def prefix(self) -> str:
        """The key's visible part, ``lmaas-<id>``."""
        return key_prefix(self.id)

    def status(self, now: datetime) -> KeyStatus:
        """``revoked`` wins over ``expired``; both refuse the key with 401."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def principal(
        self, tenant_limits: Limits | None = None, tenant_weight: float = 1.0
    ) -> Principal:
        """Who a request authenticated by this key runs as."""
        return Principal(
            self.id,
            self.tenant,
            self.scopes,
            self.models,
            self.limits,
            tenant_limits or Limits(),
            tenant_weight,
        )


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(row.name, row.description, _utc(row.created_at), row.limits, row.weight)


def _tenant_row(tenant: Tenant) -> TenantRow:
    return TenantRow(
        name=tenant.name,
        description=tenant.description,
        created_at=tenant.created_at,
        weight=tenant.weight,
        **_limit_values(tenant.limits),
    )


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        scopes=frozenset(Scope(s) for s in row.scopes),
        models=tuple(row.models),
        key_sha256=row.key_sha256,
        created_at=_utc(row.created_at),
        expires_at=_utc_or_none(row.expires_at),
        revoked_at=_utc_or_none(row.revoked_at),
        rotated_at=_utc_or_none(row.rotated_at),
        limits=row.limits,
    )


def _key_row(key: ApiKey) -> ApiKeyRow:
    return ApiKeyRow(
        id=key.id,
        tenant=key.tenant,
        name=key.name,
        key_sha256=key.key_sha256,
        scopes=sorted(s.value for s in key.scopes),
        models=list(key.models),
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        rotated_at=key.rotated_at,
        **_limit_values(key.limits),
    )


class SqlGovernanceStore:
    """Tenant and key rows over SQLAlchemy; the schema is migrated to the latest on open.

    Args:
        url: SQLAlchemy URL of the metadata DB (``sqlite:///...`` or ``postgresql://...``).

    Raises:
        InternalError: The DB cannot be opened or migrated.
    """

    def __init__(self, url: str) -> None:
        self._engine = open_migrated_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    # ---------------------------------------------------------------- tenants

    def add_tenant(self, tenant: Tenant, audit: AuditEntry | None = None) -> None:
        """Raises: ConflictError when the name is taken."""
        row = _tenant_row(tenant)
        try:
            with self._sessions.begin() as session:
                session.add(row)
                session.flush()
                _audit(session, audit)
        except IntegrityError as exc:
            raise ConflictError(f"tenant {tenant.name!r} already exists") from exc

    def get_tenant(self, name: str) -> Tenant | None:
        with self._sessions() as session:
            row = session.get(TenantRow, name)
            return None if row is None else _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self._sessions() as session:
            rows = session.scalars(select(TenantRow).order_by(TenantRow.name))
            return [_tenant(r) for r in rows]

    def delete_tenant(self, name: str, audit: AuditEntry | None = None) -> bool:
        """Delete a tenant and its keys; True if it existed."""
        with self._sessions.begin() as session:
            # Explicit, so SQLite connections without the foreign_keys pragma cascade too.
            session.execute(delete(ApiKeyRow).where(ApiKeyRow.tenant == name))
            result = session.execute(delete(TenantRow).where(TenantRow.name == name))
            _audit(session, audit)
        return bool(getattr(result, "rowcount", 0))

    def set_tenant_weight(
        self, name: str, weight: float, audit: AuditEntry | None = None
    ) -> Tenant | None:
        """Set a tenant's fair-share weight; None when no such tenant."""
        with self._sessions.begin() as session:
            session.execute(update(TenantRow).where(TenantRow.name == name).values(weight=weight))
            row = session.get(TenantRow, name)
            if row is None:
                return None
            _audit(session, audit)
            return _tenant(row)

    def set_tenant_limits(
        self, name: str, limits: Limits, audit: AuditEntry | None = None
    ) -> Tenant | None:
        """Replace a tenant's limits; None when no such tenant."""
        with self._sessions.begin() as session:
            session.execute(
                update(TenantRow).where(TenantRow.name == name).values(**_limit_values(limits))
            )
            row = session.get(TenantRow, name)
            if row is None:
                return None
            _audit(session, audit)
            return _tenant(row)

    # ---------------------------------------------------------------- keys

    def add_key(
        self,
        key: ApiKey,
        *,
        with_tenant: Tenant | None = None,
        audit: AuditEntry | None = None,
    ) -> None:
        """Insert a key (and its tenant first, in the same transaction, when given).

        Raises:
            ConflictError: the id or the tenant exists already.
        """
        try:
            with self._sessions.begin() as session:
                if with_tenant is not None:
                    session.add(_tenant_row(with_tenant))
                    session.flush()
                session.add(_key_row(key))
                session.flush()
                _audit(session, audit)
        except IntegrityError as exc:
            raise ConflictError(f"key {key.prefix} or its tenant already exists") from exc

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._sessions() as session:
            row = session.get(ApiKeyRow, key_id)
            return None if row is None else _key(row)

    def get_key_for_auth(self, key_id: str) -> tuple[ApiKey, Limits, float] | None:
        """A key with its tenant's limits and weight (one read for the auth cache); None if
        unknown."""
        with self._sessions() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                return None
            tenant = session.get(TenantRow, row.tenant)
            if tenant is None:
                return _key(row), Limits(), 1.0
            return _key(row), tenant.limits, tenant.weight

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        query = select(ApiKeyRow).order_by(ApiKeyRow.tenant, ApiKeyRow.created_at, ApiKeyRow.id)
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        with self._sessions() as session:
            return [_key(r) for r in session.scalars(query)]

    def replace_hash(
        self,
        key_id: str,
        key_sha256: str,
        rotated_at: datetime,
        expires_at: datetime | None,
        audit: AuditEntry | None = None,
    ) -> ApiKey | None:
        """Give a key a new secret (rotation); None when no such key."""
        values = {"key_sha256": key_sha256, "rotated_at": rotated_at, "expires_at": expires_at}
        return self._update(key_id, values, audit=audit)

    def set_key_limits(
        self, key_id: str, limits: Limits, audit: AuditEntry | None = None
    ) -> ApiKey | None:
        """Replace a key's limits; None when no such key."""
        return self._update(key_id, dict(_limit_values(limits)), audit=audit)

    def revoke(self, key_id: str, when: datetime, audit: AuditEntry | None = None) -> ApiKey | None:
        """Mark a key revoked (kept for the record); None when no such key."""
        return self._update(key_id, {"revoked_at": when}, only_if_active=True, audit=audit)

    def _update(
        self,
        key_id: str,
        values: dict[str, object],
        *,
        only_if_active: bool = False,
        audit: AuditEntry | None = None,
    ) -> ApiKey | None:
        query = update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(**values)
        if only_if_active:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with self._sessions.begin() as session:
            changed = bool(getattr(session.execute(query), "rowcount", 0))
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                return None
            if changed:
                _audit(session, audit)
            return _key(row)

    # ---------------------------------------------------------------- audit

    def append_audit(self, entry: AuditEntry) -> AuditRecord:
        """Append one entry on its own (actions that change no governance row)."""
        with self._sessions.begin() as session:
            return append_audit(session, entry)

    def list_audit(self, **filters: Any) -> list[AuditRecord]:
        """Audit rows (see :func:`lmaas.gateway.audit.list_audit` for the filters)."""
        with self._sessions() as session:
            return list_audit(session, **filters)

    def verify_audit(self) -> ChainReport:
        """Walk the audit chain; the report names the first broken row."""
        with self._sessions() as session:
            return _verify_chain(session)

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()
