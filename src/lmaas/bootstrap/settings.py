"""The one configuration root (H7): read once from the environment (``LMAAS_`` prefix, ``__`` for
nesting) and from CLI flags, then frozen. No other module reads ``os.environ``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default so nothing is exposed by accident."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Request bodies over this size are refused with 413 before they are parsed."""
    max_audio_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    """Largest audio file ``/v1/audio/transcriptions`` and ``/translations`` accept (OpenAI's
    25 MB); those routes' body cap is this plus room for the other form fields, instead of
    ``max_body_bytes``."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight requests may take to finish before the process exits."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """End-to-end deadline of one inference request (504 past it)."""
    max_rerank_documents: int = Field(default=1000, ge=1, le=100_000)
    """Most documents one ``/v1/rerank`` request may carry (400 above it)."""


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    worker_start_timeout_s: float = Field(default=300.0, gt=0)
    """How long a worker may take to load its model before it is declared failed."""
    restart_backoff_initial_s: float = Field(default=0.5, gt=0)
    """First delay before restarting a crashed worker; doubles on each crash in a row."""
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    """Ceiling of the restart delay."""
    max_restarts: int = Field(default=10, ge=0)
    """Crashes in a row after which a worker stays FAILED."""
    max_queued_requests: int = Field(default=256, ge=1)
    """In-flight requests per model beyond which new ones get 503 + Retry-After."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    """How often workers report their queue depth."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """``auto``, ``float32``, ``bfloat16`` or ``float16``."""


class AuthConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    enabled: bool = True
    """Every route but the health probes needs an API key. ``lmaas serve --no-auth`` turns this
    off, and is refused unless the server binds to a loopback address only."""
    public_metrics: bool = False
    """Serve ``/metrics`` without a key (a Prometheus scraper on a private network)."""
    key_cache_ttl_s: float = Field(default=5.0, ge=0, le=3600)
    """How long a gateway trusts a key record it read from the DB: a key revoked or rotated by
    another process (the CLI, another gateway) stops working within this time (0: at once, one
    DB read per request). Changes through this gateway's admin API apply at once."""


class UsageConfig(BaseModel):
    """Usage metering (``LMAAS_USAGE__*``)."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = True
    """Write one usage record per request that reached the engine."""
    flush_interval_ms: int = Field(default=500, ge=10, le=60_000)
    """Longest a record waits in memory before it is written: what a crash may lose."""
    batch_size: int = Field(default=500, ge=1, le=100_000)
    """Write as soon as this many records wait."""


class LimitsConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    backend: Literal["memory", "redis"] = "memory"
    """Where rate-limit state lives: ``memory`` (this gateway only) or ``redis`` (shared by every
    gateway on the same ``redis_url``, so limits hold across replicas)."""
    lease_ttl_s: float = Field(default=15.0, gt=0, le=3600)
    """Redis backend: how long a concurrency slot outlives a gateway that died holding it (a
    live gateway refreshes its slots every third of this)."""
    key_prefix: str = Field(default="lmaas:limits", min_length=1)
    """Redis backend: namespace of the limiter's keys (gateways sharing limits share it)."""
    redis_credit: bool = True
    """Redis backend: a busy gateway takes each limit in small chunks ahead of its requests
    and admits from them with no Redis round trip (the gateways together still never pass a
    limit; ``lmaas.gateway.redis_credit``); false: one Redis script per admission."""


class DeployConfig(BaseModel):
    """Deployments, canaries and their guards (``LMAAS_DEPLOY__*``)."""

    model_config = ConfigDict(frozen=True)

    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    """How often a gateway reads the deployments' revisions: a change made by the CLI (or
    another gateway) is applied within this time."""
    drain_timeout_s: float = Field(default=60.0, ge=0)
    """How long a replica leaving a deployment may take to finish its in-flight requests."""
    max_metric_drop: float = Field(default=0.01, ge=0)
    """Promotion gate: the largest drop of a stored evaluation metric (absolute) accepted."""
    auto_rollback: bool = True
    """Roll a canary back on its own when its error rate or p99 latency is too high."""
    window_s: float = Field(default=60.0, gt=0)
    """The window over which the gateway compares the canary with the stable version."""
    check_interval_s: float = Field(default=1.0, gt=0)
    """How often the canary guard looks at the window."""
    error_factor: float = Field(default=2.0, ge=1)
    """Roll back when the canary's error rate exceeds the stable's times this..."""
    min_error_rate: float = Field(default=0.05, ge=0, le=1)
    """...and exceeds this floor."""
    latency_factor: float = Field(default=3.0, ge=1)
    """Roll back when the canary's p99 latency exceeds the stable's times this."""
    min_requests: int = Field(default=20, ge=1)
    """Requests each version needs in the window before the guard judges."""
    fleet_heartbeat_s: float = Field(default=5.0, gt=0, le=3600)
    """How often a gateway re-publishes what it has applied (table ``deployment_fleet``) when
    nothing changed; it publishes within ``poll_interval_s`` of a change. A gateway silent for
    3 times this is no longer counted by ``lmaas deploy --wait``."""
    load_retry_initial_s: float = Field(default=5.0, ge=0, le=3600)
    """A change this gateway could not apply (a version that did not load) is tried again
    after this long, then after twice as long each time it fails again (up to
    ``load_retry_max_s``), until it loads or a new change or a stop replaces it; 0: never
    (the next change tries again)."""
    load_retry_max_s: float = Field(default=300.0, gt=0, le=86400)
    """The longest wait between two tries of a change that did not load."""
    pool_windows: bool = True
    """Judge a canary on the traffic of every gateway on the metadata DB (each publishes its
    windows there every ``check_interval_s``); false: each gateway on its own traffic."""


class Settings(BaseSettings):
    """Root of lmaas configuration."""

    model_config = SettingsConfigDict(
        env_prefix="LMAAS_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".lmaas")
    """Model store and metadata DB live here."""
    database_url: str | None = None
    """SQLAlchemy URL of the metadata DB; default ``sqlite:///<home>/lmaas.db``."""
    offline: bool = False
    """Never try to reach a model hub."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    usage: UsageConfig = Field(default_factory=UsageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for state shared by several gateways (``limits.backend=redis``):
    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix:///path``."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str) -> str:
        from lmaas.gateway.resp import RedisAddress

        RedisAddress.parse(value)  # ValueError: pydantic reports it with the setting's name
        return value

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'lmaas.db'}"
