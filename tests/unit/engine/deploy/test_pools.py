"""Replica choice inside a version, and which errors count against a version."""

from __future__ import annotations

from typing import Any, cast

import pytest

from lmaas.core import errors as e
from lmaas.core.messages import WorkerSpec
from lmaas.core.types import ModelState, Task
from lmaas.engine.pools import Deployment, Replica, VersionPool, is_server_failure
from lmaas.engine.routing import OutcomeWindow


class _FakeHandle:
    def __init__(self, state: ModelState = ModelState.READY) -> None:
        self.state = state


def _pool(*states: ModelState) -> VersionPool:
    spec = WorkerSpec("m", "1", "chat", "safetensors", "/x", [], "", "")
    replicas = [Replica(cast(Any, _FakeHandle(s))) for s in states]
    return VersionPool(Deployment(spec, Task.CHAT, 0.0), replicas, OutcomeWindow(60))


def test_least_loaded_ready_replica_wins_with_round_robin_between_equals() -> None:
    pool = _pool(ModelState.READY, ModelState.READY, ModelState.LOADING)
    first, second, third = pool.replicas
    picks = [pool.pick() for _ in range(4)]
    assert picks == [first, second, first, second]  # all idle: turns; never the loading one
    first.in_flight = 3
    assert {id(pool.pick()) for _ in range(4)} == {id(second)}
    second.in_flight = 5
    assert pool.pick() is first
    second.draining = True
    assert pool.pick() is first and pool.has_ready()
    first.handle.state = ModelState.RESTARTING
    assert not pool.has_ready()
    assert pool.pick() is first  # none ready: the first answers "not ready"
    assert pool.state() is ModelState.RESTARTING
    assert third.ready is False


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (e.InternalError("x"), True),
        (e.LmaasError("x"), True),  # how a worker's internal_error code comes back
        (e.WorkerCrashedError("x"), True),
        (e.ModelNotReadyError("x"), True),
        (e.DeadlineExceededError("x"), True),
        (RuntimeError("x"), True),
        (e.InvalidRequestError("x"), False),
        (e.ModelNotFoundError("x"), False),
        (e.RateLimitError("x"), False),
        (e.OverloadedError("x"), False),
        (e.DrainingError("x"), False),
        (GeneratorExit(), False),
    ],
)
def test_which_errors_count_against_a_version(error: BaseException, counts: bool) -> None:
    assert is_server_failure(error) is counts
