"""What the API layer is given by the composition root (``lmaas.bootstrap``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from starlette.requests import Request

from lmaas.api.auth import Authenticator
from lmaas.api.context import principal_of
from lmaas.core.errors import NotSupportedError
from lmaas.engine.protocol import EngineClient
from lmaas.gateway.keys import key_prefix
from lmaas.gateway.limited import LimitedEngineClient, Limiter
from lmaas.gateway.limits import InProcessLimiter
from lmaas.gateway.service import GovernanceService
from lmaas.gateway.tenancy import TenantEngineClient
from lmaas.gateway.usage import MeteredEngineClient, RequestUsage, UsageMeter
from lmaas.gateway.usage_store import SqlUsageStore
from lmaas.gateway.visibility import ScopedEngineClient
from lmaas.lifecycle.deployments import DeploymentService
from lmaas.lifecycle.eval_jobs import EvaluationJobs
from lmaas.lifecycle.job_params import LifecycleJobs
from lmaas.observability.metrics import Metrics
from lmaas.registry.service import RegistryService

_SCOPED_SERVICES_KEY = "lmaas.scoped_services"
USAGE_KEY = "lmaas.usage"
"""Where the metering middleware puts the request's usage accumulator in the ASGI scope."""


class ApiConfig(Protocol):
    """The server limits the API enforces; ``lmaas.bootstrap.settings.ServerConfig`` fits it.

    A Protocol rather than an import, because ``api`` sits below ``bootstrap`` in the layers.
    """

    @property
    def max_body_bytes(self) -> int:
        """Request bodies over this size get 413 before they are parsed."""
        ...

    @property
    def max_audio_upload_bytes(self) -> int:
        """Largest audio file a transcription request may upload (413 above it)."""
        ...

    @property
    def request_timeout_s(self) -> float:
        """End-to-end deadline of one inference request (504 past it)."""
        ...

    @property
    def max_rerank_documents(self) -> int:
        """Most documents one rerank request may carry (400 above it)."""
        ...


@dataclass(slots=True, frozen=True)
class DefaultApiConfig:
    """Limits for tests and embedding without settings."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_audio_upload_bytes: int = 25 * 1024 * 1024
    request_timeout_s: float = 600.0
    max_rerank_documents: int = 1000


Lifespan = Callable[[], AbstractAsyncContextManager[None]]
"""Called once at start-up; entered for the whole life of the app (start/stop the engine)."""


def _never_draining() -> bool:
    return False


@dataclass(slots=True)
class ApiServices:
    """Everything :func:`lmaas.api.create_app` needs.

    Args:
        engine: Runs models.
        config: Body cap and request deadline (a ``ServerConfig``).
        metrics: Where the API records its metrics; ``/metrics`` renders it.
        is_draining: True once shutdown started: readiness turns 503.
        version: The lmaas version reported by ``GET /v2``.
        lifespan: Optional async context manager factory wired into the app's lifespan.
        auth: Checks the key of every request but the probes; None serves without
            authentication, which only the composition root may decide (``lmaas serve
            --no-auth``, loopback only).
        governance: Tenants and keys, for the ``/admin`` routes (501 without it).
        public_metrics: Serve ``/metrics`` without a key.
        limiter: Enforces the rate limits of keys and tenants (in this process, or in Redis
            for several gateways).
        meter: Buffers and writes usage records (one per request that reached the engine);
            None: no metering.
        evaluations: Evaluation jobs, for ``/admin/evaluations`` (501 without it).
        jobs: Training, compression and conversion jobs, for ``/admin/jobs`` (501 without
            it).
        deployments: Deployment changes, for ``/admin/deployments`` (501 without it).
        registry: The model registry, for ``/admin/models`` (alias moves, history; 501
            without it). Open it with the audit hook (``bootstrap.wiring.open_registry``).
    """

    engine: EngineClient
    config: ApiConfig = field(default_factory=DefaultApiConfig)
    metrics: Metrics = field(default_factory=Metrics)
    is_draining: Callable[[], bool] = _never_draining
    version: str = "0.0.0"
    lifespan: Lifespan | None = None
    auth: Authenticator | None = None
    governance: GovernanceService | None = None
    public_metrics: bool = False
    limiter: Limiter = field(default_factory=InProcessLimiter)
    meter: UsageMeter | None = None
    evaluations: EvaluationJobs | None = None
    jobs: LifecycleJobs | None = None
    deployments: DeploymentService | None = None
    registry: RegistryService | None = None


def services_of(request: Request) -> ApiServices:
    """The services as the caller of ``request`` may use them.

    With authentication on, ``engine`` is the principal's view of the engine, in every route
    that goes through here: each request is stamped with the caller's tenant and weight for the
    engine's fair share (:class:`~lmaas.gateway.tenancy.TenantEngineClient`), listings hold only
    the models its key may see and any other model is 404 (:class:`~lmaas.gateway.visibility.
    ScopedEngineClient`), and each model call is admitted against the key's and the tenant's
    rate limits (:class:`~lmaas.gateway.limited.LimitedEngineClient`, 429 past one). With
    metering on, the innermost view counts what each admitted call used
    (:class:`~lmaas.gateway.usage.MeteredEngineClient`).
    """
    services = request.app.state.lmaas_services
    assert isinstance(services, ApiServices)
    principal = principal_of(request.scope)
    usage = request.scope.get(USAGE_KEY)
    metered = isinstance(usage, RequestUsage)
    if principal is None and not metered:
        return services
    scoped = request.scope.get(_SCOPED_SERVICES_KEY)
    if not isinstance(scoped, ApiServices):
        engine: EngineClient = services.engine
        if isinstance(usage, RequestUsage):
            # Innermost: it only sees the calls that passed visibility and the limits.
            engine = MeteredEngineClient(engine, usage)
        if principal is not None:
            engine = TenantEngineClient(engine, principal)
        if principal is not None and not principal.sees_every_model:
            engine = ScopedEngineClient(engine, principal)
        if principal is not None and principal.is_limited:
            engine = LimitedEngineClient(engine, principal, services.limiter)
        scoped = dataclasses.replace(services, engine=engine)
        request.scope[_SCOPED_SERVICES_KEY] = scoped
    return scoped


NO_AUTH_ACTOR = "local:no-auth"


def actor_of(request: Request) -> str:
    """Who the audit trail names for a change made by this request: ``lmaas-<key id>``, or
    ``local:no-auth`` on a server without authentication (loopback only)."""
    principal = principal_of(request.scope)
    return NO_AUTH_ACTOR if principal is None else key_prefix(principal.key_id)


def usage_store_of(request: Request) -> SqlUsageStore:
    """The usage table, for ``/admin/usage``.

    Raises:
        NotSupportedError: the server does not meter usage.
    """
    meter = services_of(request).meter
    if meter is None:
        raise NotSupportedError("usage metering is not configured on this server")
    return meter.store


def governance_of(request: Request) -> GovernanceService:
    """The tenants-and-keys service, for the admin routes.

    Raises:
        NotSupportedError: the server was built without one.
    """
    governance = services_of(request).governance
    if governance is None:
        raise NotSupportedError("tenants and API keys are not configured on this server")
    return governance
