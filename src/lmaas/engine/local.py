"""LocalEngineClient: the EngineClient over worker processes on this machine.

Each served name is a deployment (:class:`~lmaas.engine.deploy.DeploymentSpec`): one or more
versions with traffic weights and a number of replicas each, every replica its own supervised
worker. A request for ``name`` goes to a version by smooth weighted round robin (among the
versions with a ready replica), then to that version's least-loaded ready replica; a request for
``name:version`` goes to that version when it is deployed. :meth:`LocalEngineClient.apply`
changes a deployment live (or adds a new name): new replicas start and load first, routing
switches in one step, then the replicas that left drain (no new requests; in-flight ones
finish) and stop. :meth:`LocalEngineClient.remove` stops serving a name the same way.

Engine counters (``on_stats``) are the sum over the name's ready workers of their last
heartbeats, draining ones included (they still run requests); ``on_versions`` gets the same per
version with the replica count in each state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmaas.core.errors import DrainingError, InternalError, ModelNotFoundError
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    SeqDelta,
)
from lmaas.core.types import ModelState
from lmaas.engine.deploy import DeploymentSpec, single
from lmaas.engine.pools import (
    Deployment,
    Lease,
    Replica,
    ServedName,
    VersionPool,
    is_server_failure,
)
from lmaas.engine.protocol import ServedModel, model_not_served
from lmaas.engine.routing import (
    CanaryGuard,
    OutcomeWindow,
    SmoothWeightedRoundRobin,
    WindowCounts,
    WindowSummary,
    note_routed,
)
from lmaas.engine.worker_handle import (
    StateListener,
    StatsListener,
    SupervisionPolicy,
    WorkerHandle,
)

__all__ = ["CanaryTrial", "Deployment", "LocalEngineClient", "VersionStatus", "VersionsListener"]

_log = logging.getLogger("lmaas.engine")

DEFAULT_WINDOW_S = 60.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0


@dataclass(slots=True, frozen=True)
class VersionStatus:
    """One deployed version of a served name, for metrics.

    Attributes:
        replicas: How many of its workers are in each state (``draining`` for leaving ones).
        stats: Engine counters summed over its ready workers (their last heartbeats).
    """

    replicas: Mapping[str, int] = field(default_factory=dict)
    stats: Mapping[str, int] = field(default_factory=dict)


VersionsListener = Callable[[str, Mapping[str, VersionStatus]], None]
"""(name, status by version); an empty mapping when the name is no longer served."""


@dataclass(slots=True, frozen=True)
class CanaryTrial:
    """A served name with a canary, and this engine's windows of its two versions."""

    name: str
    stable: str
    canary: str
    stable_window: WindowCounts
    canary_window: WindowCounts


class LocalEngineClient:
    """Runs supervised worker processes for the deployed versions of each served name.

    Args:
        deployments: The versions to serve. Without ``specs`` each name appears once and gets
            all its traffic on one replica (``lmaas serve --model``).
        policy: Worker start/restart policy and admission limit.
        on_state: Called on every worker state transition (metrics).
        on_stats: Called with the name's engine counters (summed over its ready workers) on
            every worker heartbeat (metrics).
        on_versions: Called with the status of each deployed version of a name whenever a
            heartbeat, a state or the deployment changes (metrics).
        specs: Deployment specs by name (weights, replicas); each version they name must be in
            ``deployments``.
        window_s: How far back the per-version outcome windows look (canary guard).
        drain_timeout_s: How long a leaving replica's in-flight requests may take before its
            worker is stopped anyway.
    """

    def __init__(
        self,
        deployments: Iterable[Deployment],
        policy: SupervisionPolicy,
        on_state: StateListener | None = None,
        on_stats: StatsListener | None = None,
        *,
        on_versions: VersionsListener | None = None,
        specs: Mapping[str, DeploymentSpec] | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        # ipc socket paths must stay under ~100 bytes, so they live in a short temp dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="lmaas-"))
        self._policy = policy
        self._on_state = on_state
        self._on_stats = on_stats
        self._on_versions = on_versions
        self._window_s = window_s
        self._drain_timeout_s = drain_timeout_s
        self._ids = itertools.count(1)
        self._served: dict[str, ServedName] = {}
        self._retiring: set[Replica] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._errors: dict[str, str] = {}
        """Why a name that is not served could not be added (its last deployment failed)."""
        self._started = False
        self._draining = False
        by_name: dict[str, dict[str, Deployment]] = {}
        for deployment in deployments:
            versions = by_name.setdefault(deployment.spec.model_name, {})
            if deployment.spec.model_version in versions or (
                versions and (specs is None or deployment.spec.model_name not in specs)
            ):
                raise ValueError(f"model {deployment.spec.model_name} is deployed twice")
            versions[deployment.spec.model_version] = deployment
        for name, versions in by_name.items():
            spec = (specs or {}).get(name) or single(name, next(iter(versions)))
            pools = {
                t.version: self._new_pool(versions[t.version], t.replicas) for t in spec.targets
            }
            self._served[name] = ServedName(spec, pools, _router(spec))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._started = True
        for handle in self._handles():
            await handle.start()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait for every replica to be READY or FAILED; True when all are READY."""
        results = await asyncio.gather(*(h.wait_ready(timeout_s) for h in self._handles()))
        return all(results)

    def begin_draining(self) -> None:
        """Refuse new requests (503) while the in-flight ones finish."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    async def aclose(self) -> None:
        handles = [*self._handles(), *(r.handle for r in self._retiring)]
        await asyncio.gather(*(h.aclose() for h in handles))
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def num_in_flight(self) -> int:
        handles = [*self._handles(), *(r.handle for r in self._retiring)]
        return sum(h.num_in_flight for h in handles)

    def handle(self, name: str) -> WorkerHandle:
        """A worker of the stable version of a model (for operations and tests)."""
        return self._served_name(name).stable.ready_handle()

    def names(self) -> list[str]:
        return sorted(self._served)

    def spec(self, name: str) -> DeploymentSpec:
        return self._served_name(name).spec

    def revision(self, name: str) -> int:
        return self._served_name(name).revision

    def failed_to_add(self, name: str) -> str | None:
        """Why the last deployment of a name this engine does not serve failed (else None)."""
        return None if name in self._served else self._errors.get(name)

    def _handles(self) -> list[WorkerHandle]:
        return [
            replica.handle
            for served in self._served.values()
            for pool in served.pools.values()
            for replica in pool.replicas
        ]

    def _served_name(self, name: str) -> ServedName:
        try:
            return self._served[name]
        except KeyError:
            raise model_not_served(name) from None

    def _new_pool(self, deployment: Deployment, replicas: int) -> VersionPool:
        pool = VersionPool(deployment, [], OutcomeWindow(self._window_s))
        pool.replicas = [self._new_replica(deployment) for _ in range(replicas)]
        return pool

    def _new_replica(self, deployment: Deployment) -> Replica:
        spec = deployment.spec
        instance = f"{spec.model_name[:40]}-{next(self._ids)}"
        handle = WorkerHandle(
            spec, self._run_dir, self._policy, self._replica_state, self._replica_stats, instance
        )
        return Replica(handle)

    def _replica_state(self, name: str, state: ModelState) -> None:
        """Report the state of the model, not of one replica: that of its stable version
        (READY while one of its replicas is), so replicas do not overwrite each other."""
        served = self._served.get(name)
        if served is None:
            return  # still loading (reported when routed to) or removed (reported as stopped)
        if self._on_state is not None:
            if served.spec.stable in served.pools:
                state = served.stable.state()
            self._on_state(name, state)
        self._publish(name)

    def _replica_stats(self, name: str, _stats: dict[str, int]) -> None:
        self._publish(name)

    def _publish(self, name: str) -> None:
        """Hand the name's counters (summed over replicas) and per-version status to the
        listeners."""
        served = self._served.get(name)
        if served is None or (self._on_stats is None and self._on_versions is None):
            return
        leaving: dict[str, list[Replica]] = {}
        for replica in self._retiring:
            if replica.handle.name == name:
                leaving.setdefault(replica.handle.spec.model_version, []).append(replica)
        versions: dict[str, VersionStatus] = {}
        for version in {*served.pools, *leaving}:
            pool = served.pools.get(version)
            replicas = [*(pool.replicas if pool is not None else []), *leaving.get(version, [])]
            states = Counter("draining" if r.draining else r.handle.state.value for r in replicas)
            versions[version] = VersionStatus(dict(states), _summed(replicas))
        if self._on_stats is not None:
            total = _summed(
                [r for pool in served.pools.values() for r in pool.replicas]
                + [r for group in leaving.values() for r in group]
            )
            self._on_stats(name, total)
        if self._on_versions is not None:
            self._on_versions(name, versions)

    def _lock(self, name: str) -> asyncio.Lock:
        """Serializes the changes of one name (a new name has no ServedName to lock yet)."""
        return self._locks.setdefault(name, asyncio.Lock())

    # ------------------------------------------------------------------ deployments

    async def apply(
        self,
        spec: DeploymentSpec,
        versions: Mapping[str, Deployment],
        *,
        revision: int = 0,
        ready_timeout_s: float | None = None,
    ) -> None:
        """Serve ``spec`` without failing a request: start and load the new replicas, switch
        the routing at once, then drain and stop the replicas that left.

        Args:
            spec: The deployment to serve.
            versions: The worker spec of each version ``spec`` names that is not served yet.
                When the new stable version does not become ready, nothing changes (the new
                replicas stop; :meth:`describe` reports the error).
            revision: The stored revision this is (reported by :meth:`revision`).
            ready_timeout_s: How long new replicas may take to load (default: the policy's).
        """
        async with self._lock(spec.name):
            served = self._served.get(spec.name)
            if served is not None and 0 < revision < served.revision:
                return  # an older change arriving late
            if served is None:  # a new name: routed to once its replicas are up
                fresh = ServedName(spec, {}, _router(spec))
                await self._apply_locked(fresh, spec, versions, revision, ready_timeout_s)
                return
            await self._apply_locked(served, spec, versions, revision, ready_timeout_s)

    async def remove(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404 at once, in-flight ones finish on its
        replicas (up to the drain timeout), then their workers stop. Nothing when ``name`` is
        not served."""
        async with self._lock(name):
            self._errors.pop(name, None)
            served = self._served.pop(name, None)
            if served is None:
                return
            leaving = [r for pool in served.pools.values() for r in pool.replicas]
            _log.info("deployment %s stopped; %d replicas drain", name, len(leaving))
            if self._on_state is not None:
                self._on_state(name, ModelState.STOPPED)
            if self._on_versions is not None:
                self._on_versions(name, {})
            await asyncio.gather(*(self._retire(r) for r in leaving))

    async def _apply_locked(
        self,
        served: ServedName,
        spec: DeploymentSpec,
        versions: Mapping[str, Deployment],
        revision: int,
        ready_timeout_s: float | None,
    ) -> None:
        pools: dict[str, VersionPool] = {}
        new: list[Replica] = []
        leaving: list[Replica] = []
        for target in spec.targets:
            pool = served.pools.get(target.version)
            if pool is None:
                pool = VersionPool(versions[target.version], [], OutcomeWindow(self._window_s))
            live = list(pool.replicas)
            while len(live) < target.replicas:
                live.append(self._new_replica(pool.deployment))
                new.append(live[-1])
            leaving.extend(live[target.replicas :])
            kept = live[: target.replicas]
            pools[target.version] = VersionPool(pool.deployment, kept, pool.outcomes, pool.turn)
        for version, pool in served.pools.items():
            if version not in pools:
                leaving.extend(pool.replicas)
        if self._started:
            for replica in new:
                await replica.handle.start()
            timeout = ready_timeout_s or self._policy.start_timeout_s
            await asyncio.gather(*(r.handle.wait_ready(timeout) for r in new))
        fresh = not served.pools
        if not pools[spec.stable].has_ready() and (self._started or not fresh):
            # The new stable version did not come up: keep serving what runs now (a new name
            # is not served at all, so that it cannot make the whole server unready).
            why = pools[spec.stable].ready_handle().error or "no ready replica"
            still = (
                f"not serving {spec.name}" if fresh else f"still serving revision {served.revision}"
            )
            error = (
                f"revision {revision}: version {spec.stable} did not become ready ({why}); {still}"
            )
            if fresh:
                self._errors[spec.name] = error
            else:
                served.error = error
            _log.error("deployment %s: %s", spec.name, error)
            await asyncio.gather(*(r.handle.aclose() for r in new))
            return
        self._errors.pop(spec.name, None)
        served.error = None
        if spec.canary is not None and spec.canary != served.spec.canary:
            pools[spec.canary].outcomes.clear()  # a new trial starts with a clean window
        served.pools, served.router, served.spec = pools, _router(spec), spec
        served.revision = revision
        self._served[spec.name] = served  # a new name is routed to from here on
        _log.info("deployment %s now routes %s", spec.name, _describe_weights(spec))
        if self._on_state is not None:
            self._on_state(spec.name, served.stable.state())
        for replica in leaving:
            replica.draining = True
            self._retiring.add(replica)
        self._publish(spec.name)
        await asyncio.gather(*(self._retire(r) for r in leaving))

    async def _retire(self, replica: Replica) -> None:
        replica.draining = True
        self._retiring.add(replica)
        try:
            deadline = time.monotonic() + self._drain_timeout_s
            while replica.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await replica.handle.aclose()
        finally:
            self._retiring.discard(replica)
            self._publish(replica.handle.name)

    def outcomes(self, name: str, version: str) -> WindowSummary | None:
        """The outcome window of one deployed version (None when it is not deployed)."""
        pool = self._served_name(name).pools.get(version)
        return None if pool is None else pool.outcomes.summary(time.monotonic())

    def canary_verdicts(self, guard: CanaryGuard) -> list[tuple[str, str, str]]:
        """(name, canary version, reason) for each canary the guard says to roll back."""
        found = []
        now = time.monotonic()
        for name, served in self._served.items():
            canary = served.spec.canary
            if canary is None or canary not in served.pools:
                continue
            reason = guard.verdict(
                served.stable.outcomes.summary(now), served.pools[canary].outcomes.summary(now)
            )
            if reason is not None:
                found.append((name, canary, reason))
        return found

    def canary_trials(self) -> list[CanaryTrial]:
        """Each served name with a canary, with this engine's windows of stable and canary (a
        guard pooling several gateways adds them up with theirs)."""
        now = time.monotonic()
        return [
            CanaryTrial(
                name,
                served.spec.stable,
                canary,
                served.stable.outcomes.counts(now),
                served.pools[canary].outcomes.counts(now),
            )
            for name, served in self._served.items()
            if (canary := served.spec.canary) is not None and canary in served.pools
        ]

    def describe(self, name: str) -> dict[str, Any]:
        """What a served name routes to now, replica by replica (for the admin API)."""
        served = self._served_name(name)
        now = time.monotonic()
        versions = []
        for target in served.spec.targets:
            pool = served.pools[target.version]
            versions.append(
                {
                    "version": target.version,
                    "weight": target.weight,
                    "state": pool.state().value,
                    "replicas": [
                        {
                            "state": r.handle.state.value,
                            "pid": r.handle.worker_pid,
                            "in_flight": r.in_flight,
                            "restarts": r.handle.num_restarts,
                        }
                        for r in pool.replicas
                    ],
                    "window": pool.outcomes.summary(now).to_dict(),
                }
            )
        draining = sum(1 for r in self._retiring if r.handle.name == name)
        return {
            "revision": served.revision,
            "stable": served.spec.stable,
            "canary": served.spec.canary,
            "versions": versions,
            "draining_replicas": draining,
            "error": served.error,
        }

    # ------------------------------------------------------------------ EngineClient

    def list_models(self) -> list[ServedModel]:
        return [self._describe(self._served[name].stable) for name in sorted(self._served)]

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        served = self._served_name(name)
        if version is None:
            return self._describe(served.stable)
        pool = served.pools.get(version)
        if pool is None:
            deployed = ", ".join(f"{name}:{v}" for v in served.spec.versions)
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not served here; this server serves "
                f"{deployed}",
                param="model",
            )
        return self._describe(pool)

    def is_ready(self) -> bool:
        if self._draining:
            return False
        return all(served.stable.has_ready() for served in self._served.values())

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        lease = self._route(model)
        ok = failed = False
        try:
            # aclosing: closing this stream must close the handle's at once (aborts the request).
            async with contextlib.aclosing(lease.replica.handle.generate(request)) as stream:
                async for delta in stream:
                    yield delta
            ok = True
        except BaseException as exc:
            failed = is_server_failure(exc)
            raise
        finally:
            self._release(lease, ok, failed)

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        result = await self.infer(model, request)
        if not isinstance(result, EmbedResult):
            raise InternalError("the worker answered an embedding request with another result")
        return result

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        lease = self._route(model)
        ok = failed = False
        try:
            result = await lease.replica.handle.infer(request)
            ok = True
            return result
        except BaseException as exc:
            failed = is_server_failure(exc)
            raise
        finally:
            self._release(lease, ok, failed)

    def _route(self, model: str) -> Lease:
        name, _, version = model.partition(":")
        served = self._served_name(name)
        if self._draining:
            raise DrainingError("the server is shutting down; retry elsewhere", retry_after_s=5.0)
        if version:
            pool = served.pools.get(version)
            if pool is None:
                self.get_model(name, version)  # raises the 404 naming what is served
                raise AssertionError("unreachable")
        else:
            ready = {v for v, p in served.pools.items() if p.has_ready()}
            chosen = served.router.pick(ready) or served.spec.stable
            pool = served.pools[chosen]
        replica = pool.pick()
        replica.in_flight += 1
        note_routed(pool.version)
        return Lease(served, pool, replica)

    @staticmethod
    def _release(lease: Lease, ok: bool, failed: bool) -> None:
        lease.replica.in_flight -= 1
        if ok or failed:
            now = time.monotonic()
            lease.pool.outcomes.record(now, ok, now - lease.started)

    def _describe(self, pool: VersionPool) -> ServedModel:
        deployment = pool.deployment
        handle = pool.ready_handle()
        state = pool.state()
        return ServedModel(
            name=deployment.spec.model_name,
            version=deployment.spec.model_version,
            task=deployment.task,
            state=state,
            created_at=deployment.created_at,
            info=handle.info,
            error=handle.error if state is ModelState.FAILED else None,
        )


def _summed(replicas: Iterable[Replica]) -> dict[str, int]:
    """The last heartbeat counters of the ready workers among ``replicas``, added up; every
    counter any of them ever reported is present (0 when no ready worker has it)."""
    total: dict[str, int] = {}
    for replica in replicas:
        ready = replica.handle.state is ModelState.READY
        for stat, value in replica.handle.worker_stats.items():
            total[stat] = total.get(stat, 0) + (value if ready else 0)
    return total


def _router(spec: DeploymentSpec) -> SmoothWeightedRoundRobin:
    return SmoothWeightedRoundRobin([(t.version, t.weight) for t in spec.targets])


def _describe_weights(spec: DeploymentSpec) -> str:
    return ", ".join(f"{t.version}={t.weight}% x{t.replicas}" for t in spec.targets)
