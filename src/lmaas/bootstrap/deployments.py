"""Deployments in a running gateway: what it serves at start, how it follows changes made
anywhere (CLI, admin API, another gateway), and the canary guard that rolls back on its own.

* :func:`open_deployments` builds the :class:`~lmaas.lifecycle.deployments.DeploymentService`
  with the audit trail hooked into each change's transaction.
* :func:`plan_serving` turns ``lmaas serve --model`` values into deployments: a stored
  deployment is followed; a pinned version (or a name without one) is recorded as one.
* :class:`DeploymentController` polls the stored revisions every ``deploy.poll_interval_s`` (at
  once when this gateway made the change) and has the engine apply what changed (new names and
  stopped ones too, unless the gateway was started for some names only); every
  ``deploy.check_interval_s`` it publishes the engine's canary windows to the DB, reads those of
  every gateway, and rolls back the canaries the guard condemns on the pooled traffic
  (``auto-rollback`` in the history and the audit trail). Each poll round it publishes what
  it has applied to the fleet table when that changed (else every ``deploy.fleet_heartbeat_s``):
  ``lmaas deploy --wait`` reads it.
* A change this gateway could not apply (a version that did not load) is tried again with
  exponential backoff (``deploy.load_retry_initial_s`` doubling up to ``load_retry_max_s``)
  until it loads, or a new change or a stop of the name replaces it; the tries and the next
  one show under ``live`` and in the fleet rows (``retry``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from lmaas.bootstrap.load_retry import LoadRetries
from lmaas.bootstrap.settings import Settings
from lmaas.core.errors import LmaasError
from lmaas.core.types import parse_model_ref
from lmaas.engine.deploy import DeploymentSpec
from lmaas.engine.local import CanaryTrial, Deployment, LocalEngineClient
from lmaas.engine.routing import CanaryGuard, GuardConfig, WindowCounts
from lmaas.gateway.audit import AuditEntry, append_audit
from lmaas.lifecycle.deployments import FLEET_FRESH_FACTOR, DeploymentService
from lmaas.registry.deployments_db import FLEET_GATEWAY_ROW, DeploymentChange, VersionWindow
from lmaas.registry.manifest import Manifest
from lmaas.registry.service import RegistryService

_log = logging.getLogger("lmaas.deploy")

SERVE_ACTOR = "system:serve"
AUTO_ROLLBACK_ACTOR = "system:canary-guard"

_MIN_FRESH_S = 5.0
"""A gateway's published window counts while younger than this (or 3 guard intervals)."""

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
        registry,
        max_metric_drop=settings.deploy.max_metric_drop,
        audit=audit_deployment_change,
        fleet_fresh_s=FLEET_FRESH_FACTOR * settings.deploy.fleet_heartbeat_s,
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
    Without ``refs`` (the whole store), names whose deployment was stopped stay stopped.
    """
    pinned = [_pins(ref) for ref in refs] if refs else [False] * len(manifests)
    stopped = set() if refs else service.stopped()
    plan = ServingPlan()
    for manifest, pin in zip(manifests, pinned, strict=True):
        if manifest.name in stopped:
            continue
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
    """Keeps the engine on the stored deployments, and guards canaries.

    A gateway serving the whole store (``lmaas serve`` without ``--model``: ``names`` is None)
    follows every stored deployment: a name deployed while it runs is loaded and served, a
    stopped one drains and stops. A gateway started with ``--model`` (``names``) serves exactly
    those names and ignores the deployments of others.

    Args:
        engine: The local engine.
        service: The deployment service (its ``on_change`` wakes this controller).
        version_deployment: Builds the worker spec of a version the engine does not run yet.
        settings: ``deploy`` settings (poll interval, guard).
        revisions: The revision of each served name the engine started with.
        names: The names this gateway may serve; None for every stored deployment.
    """

    def __init__(
        self,
        engine: LocalEngineClient,
        service: DeploymentService,
        version_deployment: VersionDeployment,
        settings: Settings,
        revisions: dict[str, int],
        names: Collection[str] | None = None,
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
        self._names = None if names is None else frozenset(names)
        self._requested = dict(revisions)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[str] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._gateway = f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Names this gateway's rows of the shared canary windows."""
        self._published = False
        self._failed: dict[str, tuple[int, str]] = {}
        """Name → (revision, error) of its last change that this gateway could not apply."""
        self._retries = LoadRetries(
            settings.deploy.load_retry_initial_s,
            settings.deploy.load_retry_max_s,
            on_due=self._converge,
            clock=time.time,
        )
        self._fleet_sent: dict[str, dict[str, Any]] | None = None
        self._fleet_sent_at = 0.0
        service.on_change = lambda _change: self.wake()
        service.live = self._live

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._watch(), name="deployments-watch"))
        if self._config.auto_rollback:
            self._tasks.append(asyncio.create_task(self._guard_loop(), name="canary-guard"))

    async def aclose(self) -> None:
        self._retries.cancel_all()
        tasks = [*self._tasks, *self._workers.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._withdraw_windows()
        if self._fleet_sent is not None:
            with contextlib.suppress(Exception):  # stale rows stop counting on their own
                store = self._service.registry.deployments
                await asyncio.to_thread(store.publish_fleet, self._gateway, {})

    def wake(self) -> None:
        """Read the revisions now (callable from any thread: admin routes run in a pool)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def follows(self, name: str) -> bool:
        """Whether this gateway serves ``name`` when it is deployed."""
        return self._names is None or name in self._names

    def _live(self, name: str) -> dict[str, object] | None:
        retrying = self._retries.describe(name, time.time())
        if name in self._engine.names():
            return {**self._engine.describe(name), "retry": retrying}
        error = self._engine.failed_to_add(name)
        if error is None:
            return None
        return {
            "revision": 0,
            "versions": [],
            "draining_replicas": 0,
            "error": error,
            "retry": retrying,
        }

    async def _watch(self) -> None:
        while True:
            try:
                await self._publish_fleet()
            except Exception:  # the DB may be briefly unreachable: try again next round
                _log.exception("publishing what this gateway applied failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.poll_interval_s)
            self._wake.clear()
            try:
                await self._poll_once()
            except Exception:  # the DB may be briefly unreachable: try again next round
                _log.exception("reading the deployments failed")

    def fleet_reports(self) -> dict[str, dict[str, Any]]:
        """What this gateway publishes: per name it serves or is applying, the revision it
        routes (0: none yet), ready and wanted replicas per version, and its last failure; and
        the heartbeat row (the names it follows; None for every deployed name)."""
        reports: dict[str, dict[str, Any]] = {
            FLEET_GATEWAY_ROW: {"follows": None if self._names is None else sorted(self._names)}
        }
        for name in {*self._engine.names(), *self._requested, *self._failed}:
            report: dict[str, Any] = {"revision": 0, "versions": {}, "draining": 0}
            if name in self._engine.names():
                live = self._engine.describe(name)
                report["revision"] = live["revision"]
                report["draining"] = live["draining_replicas"]
                report["versions"] = {
                    v["version"]: {
                        "ready": sum(1 for r in v["replicas"] if r["state"] == "ready"),
                        "replicas": len(v["replicas"]),
                    }
                    for v in live["versions"]
                }
            report["requested"] = self._requested.get(name, 0)
            failed = self._failed.get(name)
            report["failed_revision"], report["error"] = failed if failed else (None, None)
            report["retry"] = self._retries.describe(name)
            reports[name] = report
        return reports

    async def _publish_fleet(self) -> None:
        reports = self.fleet_reports()
        now = time.monotonic()
        if (
            reports == self._fleet_sent
            and now - self._fleet_sent_at < self._config.fleet_heartbeat_s
        ):
            return
        store = self._service.registry.deployments
        await asyncio.to_thread(store.publish_fleet, self._gateway, reports)
        self._fleet_sent, self._fleet_sent_at = reports, now

    async def _poll_once(self) -> None:
        revisions = await asyncio.to_thread(self._service.registry.deployments.revisions)
        for name, revision in revisions.items():
            if self.follows(name) and revision > self._requested.get(name, 0):
                self._requested[name] = revision
                self._retries.cancel(name)  # the new change replaces the failed one
                self._converge(name)
        # Served (or being added) here, no longer stored: stopped.
        for name in {*self._engine.names(), *self._requested} - revisions.keys():
            self._requested.pop(name, None)
            self._retries.cancel(name)
            self._converge(name)

    def _converge(self, name: str) -> None:
        """Bring ``name`` to its stored deployment, one change of a name at a time (a change
        that arrives while one is applied is read when that one is done)."""
        self._pending.add(name)
        worker = self._workers.get(name)
        if worker is None or worker.done():
            self._workers[name] = asyncio.create_task(self._follow(name), name=f"deploy-{name}")

    async def _follow(self, name: str) -> None:
        while name in self._pending:
            self._pending.discard(name)
            stored = None
            try:
                stored = await asyncio.to_thread(self._service.registry.deployments.get, name)
                if stored is None:
                    self._failed.pop(name, None)
                    self._retries.cancel(name)
                    await self._engine.remove(name)
                    continue
                spec = DeploymentSpec.from_dict(stored.spec)
                versions = {
                    v: await asyncio.to_thread(self._version_deployment, name, v)
                    for v in spec.versions
                }
                await self._engine.apply(spec, versions, revision=stored.revision)
                self._note_outcome(name, stored.revision)
            except (LmaasError, OSError, KeyError, ValueError) as exc:
                _log.exception("applying the deployment of %s failed", name)
                if stored is not None:
                    self._failed[name] = (stored.revision, str(exc))
            finally:
                if stored is not None:
                    self._after_try(name, stored.revision)
                self.wake()  # publish what was applied without waiting for the next round

    def _after_try(self, name: str, revision: int) -> None:
        """Schedule the next try of ``revision`` when it failed (backoff); forget the tries
        when it was applied."""
        failed = self._failed.get(name)
        if failed is None or failed[0] != revision:
            self._retries.cancel(name)
        elif self._loop is not None:
            self._retries.failed(name, revision, self._loop)

    def _note_outcome(self, name: str, revision: int) -> None:
        """Record whether the engine now routes ``revision`` of ``name`` (or why not)."""
        if name in self._engine.names() and self._engine.revision(name) >= revision:
            self._failed.pop(name, None)
            return
        error = (
            self._engine.describe(name)["error"]
            if name in self._engine.names()
            else self._engine.failed_to_add(name)
        )
        if error is not None:
            self._failed[name] = (revision, str(error))

    async def _guard_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.check_interval_s)
            try:
                verdicts = await self._verdicts()
            except Exception:  # the DB may be briefly unreachable: judge again next round
                _log.exception("the canary guard could not read the windows")
                continue
            for name, canary, reason in verdicts:
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

    async def _verdicts(self) -> list[tuple[str, str, str]]:
        """(name, canary, reason) of each canary to roll back: judged on the windows of every
        gateway (published through the DB), or on this gateway's alone."""
        if not self._config.pool_windows:
            return self._engine.canary_verdicts(self._guard)
        trials = self._engine.canary_trials()
        if not trials and not self._published:
            return []
        mine = [
            VersionWindow(self._gateway, t.name, version, window.to_dict())
            for t in trials
            for version, window in ((t.stable, t.stable_window), (t.canary, t.canary_window))
        ]
        fresh_s = max(_MIN_FRESH_S, 3 * self._config.check_interval_s)
        rows = await asyncio.to_thread(
            self._service.registry.deployments.exchange_windows, self._gateway, mine, fresh_s
        )
        self._published = bool(mine)
        return pooled_verdicts(self._guard, trials, rows)

    async def _withdraw_windows(self) -> None:
        if self._published:
            with contextlib.suppress(Exception):  # stale rows expire on their own
                store = self._service.registry.deployments
                await asyncio.to_thread(store.exchange_windows, self._gateway, [], 0.0)


def pooled_verdicts(
    guard: CanaryGuard, trials: list[CanaryTrial], rows: list[VersionWindow]
) -> list[tuple[str, str, str]]:
    """The guard's verdict on each trial over the windows of every gateway in ``rows``."""
    found = []
    for trial in trials:
        mine = [r for r in rows if r.name == trial.name]

        def pooled(version: str, rows_of_name: list[VersionWindow] = mine) -> WindowCounts:
            return WindowCounts.pooled(
                WindowCounts.from_dict(r.counts) for r in rows_of_name if r.version == version
            )

        reason = guard.verdict(pooled(trial.stable).summary(), pooled(trial.canary).summary())
        if reason is not None:
            gateways = len({r.gateway for r in mine})
            if gateways > 1:
                reason += f" (pooled over {gateways} gateways)"
            found.append((trial.name, trial.canary, reason))
    return found
