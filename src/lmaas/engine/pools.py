"""The replicas of the versions of one served name, as the local engine routes over them.

A :class:`VersionPool` is one version: its worker spec and its replicas (each a supervised
worker process). A :class:`ServedName` is one model name: its current
:class:`~lmaas.engine.deploy.DeploymentSpec`, a pool per deployed version and the weighted
router between them. Replicas that left the deployment drain: no new request goes to them, the
engine waits for their in-flight ones, then stops their worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmaas.core.errors import (
    AuthenticationError,
    ConflictError,
    DrainingError,
    InvalidRequestError,
    NotFoundError,
    NotSupportedError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
)
from lmaas.core.messages import WorkerSpec
from lmaas.core.types import ModelState, Task
from lmaas.engine.deploy import DeploymentSpec
from lmaas.engine.routing import OutcomeWindow, SmoothWeightedRoundRobin
from lmaas.engine.worker_handle import WorkerHandle


@dataclass(slots=True, frozen=True)
class Deployment:
    """One model version to serve: its worker spec plus what the API lists about it."""

    spec: WorkerSpec
    task: Task
    created_at: float


@dataclass(slots=True, eq=False)
class Replica:
    """One worker process of a version; ``in_flight`` counts requests routed to it."""

    handle: WorkerHandle
    in_flight: int = 0
    draining: bool = False

    @property
    def ready(self) -> bool:
        return not self.draining and self.handle.state is ModelState.READY


@dataclass(slots=True, eq=False)
class VersionPool:
    """The replicas of one deployed version."""

    deployment: Deployment
    replicas: list[Replica]
    outcomes: OutcomeWindow
    turn: int = 0
    """Round-robin position among equally loaded replicas."""

    @property
    def version(self) -> str:
        return self.deployment.spec.model_version

    def has_ready(self) -> bool:
        return any(r.ready for r in self.replicas)

    def pick(self) -> Replica:
        """The ready replica with the fewest requests in flight (round robin among equals);
        the first replica when none is ready (its handle then answers 'not ready')."""
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            return self.replicas[0]
        start = self.turn % len(ready)
        self.turn += 1
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.in_flight)

    def state(self) -> ModelState:
        """READY when a replica is; else the first replica's state."""
        if self.has_ready():
            return ModelState.READY
        return self.replicas[0].handle.state if self.replicas else ModelState.STOPPED

    def ready_handle(self) -> WorkerHandle:
        ready = [r for r in self.replicas if r.ready]
        return (ready or self.replicas)[0].handle


@dataclass(slots=True, eq=False)
class ServedName:
    """One model name: what it routes to now."""

    spec: DeploymentSpec
    pools: dict[str, VersionPool]
    router: SmoothWeightedRoundRobin
    revision: int = 0
    """The revision of the stored deployment applied (0: the one the server started with)."""
    error: str | None = None
    """Why the last change could not be applied (None once one is)."""

    @property
    def stable(self) -> VersionPool:
        return self.pools[self.spec.stable]


@dataclass(slots=True, frozen=True)
class Lease:
    """A request routed to one replica: released when the request ends."""

    served: ServedName
    pool: VersionPool
    replica: Replica
    started: float = field(default_factory=time.monotonic)


_NOT_THE_VERSIONS_FAULT = (
    InvalidRequestError,
    PayloadTooLargeError,
    AuthenticationError,
    PermissionDeniedError,
    NotFoundError,
    ConflictError,
    RateLimitError,
    NotSupportedError,
    OverloadedError,
    DrainingError,
)


def is_server_failure(exc: BaseException) -> bool:
    """Whether an error counts against the version that served it (a canary's error rate):
    crashes, internal errors (however the worker coded them), deadlines and load failures do;
    the caller's mistakes, a full queue and shutdown do not, nor a cancelled request."""
    return isinstance(exc, Exception) and not isinstance(exc, _NOT_THE_VERSIONS_FAULT)
