"""Wire schemas of the tenant and key admin routes (what ``/openapi.json`` documents)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmaas.gateway.limits import Limits
from lmaas.gateway.quotas import Quota, make_quota
from lmaas.gateway.service import IssuedKey
from lmaas.gateway.store import ApiKey, KeyStatus, Tenant


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuotaBody(BaseModel):
    """At most ``limit`` of ``metric`` per UTC calendar ``period``."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["tokens", "requests", "audio_seconds", "images"]
    limit: float = Field(
        gt=0, description="The most the period allows (a whole number but for audio_seconds)."
    )
    period: Literal["day", "month"] = Field(
        description="Resets at 00:00 UTC (day) or on the 1st of the month, 00:00 UTC (month)."
    )

    def to_quota(self) -> Quota:
        return make_quota(self.metric, self.limit, self.period)

    @classmethod
    def of(cls, quota: Quota) -> QuotaBody:
        return cls.model_validate(quota.as_dict())


class LimitsBody(BaseModel):
    """Rate limits and quotas; an absent or null field is unlimited."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(
        default=None, ge=1, description="Tokens per minute (prompt + max_tokens reserved)."
    )
    max_concurrent: int | None = Field(default=None, ge=1, description="Requests in flight.")
    quotas: list[QuotaBody] = Field(
        default_factory=list,
        max_length=8,
        description="Quotas per day or month (tokens, requests, audio_seconds, images); "
        "exceeding one answers 429 with code quota_exceeded and Retry-After until the reset.",
    )

    def to_limits(self) -> Limits:
        quotas = tuple(q.to_quota() for q in self.quotas)
        return Limits(self.rpm, self.tpm, self.max_concurrent, quotas)

    @classmethod
    def of(cls, limits: Limits) -> LimitsBody:
        return cls(
            rpm=limits.rpm,
            tpm=limits.tpm,
            max_concurrent=limits.max_concurrent,
            quotas=[QuotaBody.of(q) for q in limits.quotas],
        )


class TenantCreateRequest(_Request):
    name: str = Field(max_length=64, description="Lower-case letters, digits, '.', '_', '-'.")
    description: str = Field(default="", max_length=256)
    limits: LimitsBody = Field(default_factory=LimitsBody, description="Shared by its keys.")
    weight: float = Field(
        default=1.0, gt=0, le=1000, description="Fair-share weight in the engine queues."
    )


class TenantWeightRequest(_Request):
    weight: float = Field(gt=0, le=1000, description="Fair-share weight in the engine queues.")


class TenantResponse(BaseModel):
    object: Literal["tenant"] = "tenant"
    name: str
    description: str
    created_at: datetime
    limits: LimitsBody
    weight: float = 1.0

    @classmethod
    def of(cls, tenant: Tenant) -> TenantResponse:
        return cls(
            name=tenant.name,
            description=tenant.description,
            created_at=tenant.created_at,
            limits=LimitsBody.of(tenant.limits),
            weight=tenant.weight,
        )


class TenantListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantResponse]


class KeyCreateRequest(_Request):
    tenant: str = Field(max_length=64)
    scopes: list[str] = Field(
        min_length=1, max_length=3, description="admin, models:read and/or inference."
    )
    models: list[str] = Field(
        default=["*"], max_length=64, description="Model names or globs the key may see."
    )
    name: str = Field(default="", max_length=64, description="A label for people.")
    expires_in: str | None = Field(default=None, description="Lifetime: 90s, 15m, 12h, 30d, 2w.")
    limits: LimitsBody = Field(default_factory=LimitsBody)


class KeyRotateRequest(_Request):
    expires_in: str | None = Field(
        default=None, description="A new lifetime from now; the old expiry is kept if absent."
    )


class KeyResponse(BaseModel):
    """A key's record; never its secret."""

    object: Literal["api_key"] = "api_key"
    id: str
    prefix: str = Field(description="The visible start of the key, lmaas-<id>.")
    tenant: str
    name: str
    scopes: list[str]
    models: list[str]
    status: KeyStatus
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_at: datetime | None
    limits: LimitsBody

    @classmethod
    def of(cls, key: ApiKey, now: datetime) -> KeyResponse:
        return cls.model_validate(_key_fields(key, now))


class IssuedKeyResponse(KeyResponse):
    """A key just created or rotated, with its secret: shown this once, stored only hashed."""

    secret: str

    @classmethod
    def issued(cls, issued: IssuedKey, now: datetime) -> IssuedKeyResponse:
        return cls.model_validate({**_key_fields(issued.key, now), "secret": issued.secret})


class KeyListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyResponse]


class TenantDeletedResponse(BaseModel):
    object: Literal["tenant.deleted"] = "tenant.deleted"
    name: str
    deleted: bool = True


def _key_fields(key: ApiKey, now: datetime) -> dict[str, object]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "tenant": key.tenant,
        "name": key.name,
        "scopes": sorted(s.value for s in key.scopes),
        "models": list(key.models),
        "status": key.status(now),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "rotated_at": key.rotated_at,
        "limits": LimitsBody.of(key.limits),
    }
