"""Deployments in a running gateway: what it serves at start, how it follows changes made
anywhere (CLI, admin API, another gateway), and the canary guard that rolls back on its own.

* :func:`open_deployments` builds the :class:`~lmaas.lifecycle.deployments.DeploymentService`
  with the audit trail hooked into each change's transaction.
* :func:`plan_serving` turns ``lmaas serve --model`` values into deployments: a stored
  deployment is followed; a pinned version (or a name without one) is recorded as one.
* :class:`DeploymentController` polls the stored revisions every ``deploy.poll_interval_s`` (at
  once when this gateway made the change) and has the engine apply what changed; every
  ``deploy.check_interval_s`` it asks the engine for canaries the guard condemns and rolls them
  back (``auto-rollback`` in the history and the audit trail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from lmaas.bootstrap.settings import Settings
from lmaas.core.errors import LmaasError
from lmaas.core.types import parse_model_ref
from lmaas.engine.deploy import DeploymentSpec
from lmaas.engine.local import Deployment, LocalEngineClient
from lmaas.engine.routing import CanaryGuard, GuardConfig
from lmaas.gateway.audit import AuditEntry, append_audit
from lmaas.lifecycle.deployments import DeploymentService
from lmaas.registry.deployments_db import DeploymentChange
from lmaas.registry.manifest import Manifest
from lmaas.registry.service import RegistryService

_log = logging.getLogger("lmaas.deploy")

SERVE_ACTOR = "system:serve"
AUTO_ROLLBACK_ACTOR = "system:canary-guard"

VersionDeployment = Callable[[str, str], Deployment]
"""(name, version) → the worker spec to serve it."""


def audit_deployment_change(session: Session, change: DeploymentChange) -> None:
    """Append the audit row of a deployment change in the change's own transaction."""
    after = {**change.spec, "revision": change.revision}
    if change.reason:
        after["reason"] = change.reason
    entry = AuditEntry(
        change.actor, f"deployment.{change.action}", change.name, change.previous, after
    )
    append_audit(session, entry)


def open_deployments(settings: Settings, registry: RegistryService) -> DeploymentService:
    """The deployment service over ``registry``, each change audited."""
    return DeploymentService(
        registry, max_metric_drop=settings.deploy.max_metric_drop, audit=audit_deployment_change
    )


@dataclass(slots=True)
class ServingPlan:
    """What a starting gateway serves: every version's worker spec, and the specs by name."""

    deployments: list[Deployment] = field(default_factory=list)
    specs: dict[str, DeploymentSpec] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)


def plan_serving(
    service: DeploymentService,
    manifests: list[Manifest],
    refs: list[str],
    version_deployment: VersionDeployment,
) -> ServingPlan:
    """The deployments to serve for the models ``resolve_models`` chose from ``refs``.

    A ref that pins a version (``name:3``, ``name@alias``, a path to import) deploys that
    version unless it already is the stored deployment's stable version; a plain ``name`` (or
    no ``--model``) follows the stored deployment, or records one on the chosen version.
    """
    pinned = [_pins(ref) for ref in refs] if refs else [False] * len(manifests)
    plan = ServingPlan()
    for manifest, pin in zip(manifests, pinned, strict=True):
        view = service.ensure_serving(
            manifest.name, manifest.version if pin else None, actor=SERVE_ACTOR
        )
        plan.specs[manifest.name] = view.spec
        plan.revisions[manifest.name] = view.revision
        for version in view.spec.versions:
            plan.deployments.append(version_deployment(manifest.name, version))
    return plan


def _pins(ref: str) -> bool:
    parsed = parse_model_ref(ref)
    return parsed is None or parsed.version is not None or parsed.alias is not None


class DeploymentController:
    """Keeps the engine on the stored deployments of the names it serves, and guards canaries.

    Args:
        engine: The local engine.
        service: The deployment service (its ``on_change`` wakes this controller).
        version_deployment: Builds the worker spec of a version the engine does not run yet.
        settings: ``deploy`` settings (poll interval, guard).
        revisions: The revision of each served name the engine started with.
    """

    def __init__(
        self,
        engine: LocalEngineClient,
        service: DeploymentService,
        version_deployment: VersionDeployment,
        settings: Settings,
        revisions: dict[str, int],
    ) -> None:
        self._engine = engine
        self._service = service
        self._version_deployment = version_deployment
        self._config = settings.deploy
        self._guard = CanaryGuard(
            GuardConfig(
                error_factor=settings.deploy.error_factor,
                min_error_rate=settings.deploy.min_error_rate,
                latency_factor=settings.deploy.latency_factor,
                min_requests=settings.deploy.min_requests,
            )
        )
        self._requested = dict(revisions)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._applying: set[asyncio.Task[None]] = set()
        service.on_change = lambda _change: self.wake()
        service.live = self._live

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._watch(), name="deployments-watch"))
        if self._config.auto_rollback:
            self._tasks.append(asyncio.create_task(self._guard_loop(), name="canary-guard"))

    async def aclose(self) -> None:
        for task in [*self._tasks, *self._applying]:
            task.cancel()
        for task in [*self._tasks, *self._applying]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Read the revisions now (callable from any thread: admin routes run in a pool)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def _live(self, name: str) -> dict[str, object] | None:
        if name not in self._engine.names():
            return None
        return self._engine.describe(name)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.poll_interval_s)
            self._wake.clear()
            try:
                await self._poll_once()
            except Exception:  # the DB may be briefly unreachable: try again next round
                _log.exception("reading the deployments failed")

    async def _poll_once(self) -> None:
        revisions = await asyncio.to_thread(self._service.registry.deployments.revisions)
        for name in self._engine.names():
            revision = revisions.get(name)
            if revision is None or revision <= self._requested.get(name, 0):
                continue
            self._requested[name] = revision
            task = asyncio.create_task(self._apply(name), name=f"deploy-{name}")
            self._applying.add(task)
            task.add_done_callback(self._applying.discard)

    async def _apply(self, name: str) -> None:
        try:
            view = await asyncio.to_thread(self._service.get, name)
            if view.revision < self._requested.get(name, 0):
                return  # a newer change is on its way
            spec = view.spec
            versions = {
                v: await asyncio.to_thread(self._version_deployment, name, v) for v in spec.versions
            }
            await self._engine.apply(spec, versions, revision=view.revision)
        except (LmaasError, OSError, KeyError):
            _log.exception("applying the deployment of %s failed", name)

    async def _guard_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval_s)
            for name, canary, reason in self._engine.canary_verdicts(self._guard):
                _log.warning("rolling back canary %s:%s: %s", name, canary, reason)
                try:
                    await asyncio.to_thread(
                        self._service.rollback,
                        name,
                        actor=AUTO_ROLLBACK_ACTOR,
                        reason=reason,
                        action="auto-rollback",
                        only_canary=canary,
                    )
                except LmaasError:
                    _log.exception("the automatic rollback of %s failed", name)
