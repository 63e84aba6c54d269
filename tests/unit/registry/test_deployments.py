"""Deployments in the metadata DB (SQLite and PostgreSQL): changes with their history and
audit rows in one transaction, the promotion gate on stored metrics, rollback targets."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lmaas.bootstrap.deployments import audit_deployment_change, plan_serving, pooled_verdicts
from lmaas.core.errors import (
    ConflictError,
    GateRefusedError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
)
from lmaas.engine.local import CanaryTrial
from lmaas.engine.routing import CanaryGuard, GuardConfig, WindowCounts
from lmaas.gateway.service import GovernanceService
from lmaas.lifecycle.deployments import DeploymentService, alias_follower, chain_alias_hooks
from lmaas.registry.deployments_db import DeploymentChange, VersionWindow
from lmaas.registry.lifecycle_db import StoredMetric
from lmaas.registry.service import RegistryService

MakeModelDir = Callable[..., Path]


@pytest.fixture
def service(registry: RegistryService, make_model_dir: MakeModelDir) -> DeploymentService:
    src = make_model_dir()
    for _ in range(3):
        registry.import_model(str(src), name="m")
    return DeploymentService(registry, max_metric_drop=0.01, audit=audit_deployment_change)


@pytest.fixture
def governance(database_url: str) -> Iterator[GovernanceService]:
    gov = GovernanceService.open(database_url)
    try:
        yield gov
    finally:
        gov.close()


def _metric(value: float, metric: str = "accuracy") -> StoredMetric:
    return StoredMetric(metric, value, "d" * 64, "eval.jsonl", "test", 100, datetime.now(UTC))


def test_changes_are_versioned_with_history_and_audit(
    service: DeploymentService, governance: GovernanceService
) -> None:
    seen: list[DeploymentChange] = []
    service.on_change = seen.append
    with pytest.raises(NotFoundError, match="no deployment"):
        service.get("m")
    service.set_version("m", "1", replicas=2, actor="cli:alice")
    service.canary("m", "2", 10, actor="cli:alice", reason="try 2")
    view = service.get("m")
    assert view.revision == 2 and view.spec.canary == "2" and view.updated_by == "cli:alice"
    assert view.spec.target("1") is not None and view.spec.weight_of("2") == 10
    service.rollback("m", actor="lmaas-abc")
    history = service.history("m")
    assert [(c.revision, c.action, c.actor) for c in history] == [
        (1, "set", "cli:alice"),
        (2, "canary", "cli:alice"),
        (3, "rollback", "lmaas-abc"),
    ]
    assert history[1].reason == "try 2"
    assert history[1].previous == history[0].spec
    assert [c.revision for c in seen] == [1, 2, 3]
    assert service.registry.deployments.revisions() == {"m": 3}
    audit = governance.list_audit(target="m")
    assert [r.action for r in reversed(audit)] == [
        "deployment.set",
        "deployment.canary",
        "deployment.rollback",
    ]
    assert audit[1].after is not None and audit[1].after["reason"] == "try 2"
    assert audit[0].before == history[1].spec
    assert governance.verify_audit().ok


def test_versions_are_checked_and_aliases_accepted(
    service: DeploymentService, registry: RegistryService
) -> None:
    with pytest.raises(ModelNotFoundError):
        service.set_version("m", "9", actor="t")
    with pytest.raises(ModelNotFoundError):
        service.set_version("nope", "1", actor="t")
    with pytest.raises(InvalidRequestError):
        service.set_version("m", "../1", actor="t")
    registry.set_alias("m", "production", "2")
    service.set_version("m", "production", actor="t")
    assert service.get("m").spec.stable == "2"
    service.canary("m", "m:3", 20, actor="t")
    assert service.get("m").spec.canary == "3"
    service.set_version("m", "@production", actor="t")
    assert service.get("m").spec.canary is None
    assert service.history("m")[-1].revision == 3


def test_a_refused_change_writes_nothing(
    service: DeploymentService, governance: GovernanceService
) -> None:
    with pytest.raises(NotFoundError):
        service.canary("m", "2", 10, actor="t")
    service.set_version("m", "1", actor="t")
    with pytest.raises(InvalidRequestError):
        service.canary("m", "1", 10, actor="t")
    with pytest.raises(ConflictError, match="no canary to promote"):
        service.promote("m", actor="t")
    with pytest.raises(ConflictError, match="no canary and no earlier"):
        service.rollback("m", actor="t")
    assert [c.revision for c in service.history("m")] == [1]
    assert len(governance.list_audit(target="m")) == 1


def test_promotion_gate_on_stored_metrics(
    service: DeploymentService, registry: RegistryService
) -> None:
    registry.add_metrics(registry.get("m", "1"), [_metric(0.90)])
    registry.add_metrics(registry.get("m", "2"), [_metric(0.80)])
    registry.add_metrics(registry.get("m", "3"), [_metric(0.895)])
    service.set_version("m", "1", actor="t")
    service.canary("m", "2", 10, actor="t")
    with pytest.raises(GateRefusedError, match=r"accuracy of m:2 is 0\.8000 against 0\.9000"):
        service.promote("m", actor="t")
    assert service.get("m").spec.stable == "1"  # refused: nothing changed
    change, gate = service.promote("m", actor="t", max_drop=0.2)  # a wider margin passes
    assert gate.passed and change.spec["stable"] == "2"
    assert "gate passed (1 shared metrics)" in change.reason
    service.canary("m", "1", 10, actor="t")  # back from 0.80 to 0.90: fine
    service.promote("m", actor="t")
    service.canary("m", "2", 10, actor="t")
    change, gate = service.promote("m", actor="t", force=True, reason="hotfix")
    assert not gate.passed and change.spec["stable"] == "2"
    assert change.reason.startswith("hotfix; gate refused, promoted with --force")
    service.canary("m", "3", 50, actor="t")
    assert service.promote("m", actor="t")[1].passed  # 0.895 vs 0.80


def test_rollback_without_canary_returns_to_the_previous_stable(
    service: DeploymentService,
) -> None:
    service.set_version("m", "1", replicas=2, actor="t")
    service.canary("m", "2", 10, actor="t")
    service.promote("m", actor="t")
    service.scale("m", 3, actor="t")
    change = service.rollback("m", actor="t")
    assert change is not None
    assert change.spec["stable"] == "1" and change.spec["targets"][0]["replicas"] == 3
    # Automatic rollback acts only while its canary is still the canary.
    assert service.rollback("m", actor="guard", only_canary="2", action="auto-rollback") is None
    service.canary("m", "3", 10, actor="t")
    done = service.rollback("m", actor="guard", only_canary="3", action="auto-rollback")
    assert done is not None and done.action == "auto-rollback"
    assert service.get("m").spec.canary is None


def test_ensure_serving_follows_or_records(service: DeploymentService) -> None:
    first = service.ensure_serving("m", None, actor="system:serve")
    assert first.spec.stable == "3" and first.revision == 1  # the latest, recorded
    service.canary("m", "2", 10, actor="t")
    followed = service.ensure_serving("m", None, actor="system:serve")
    assert followed.spec.canary == "2" and followed.revision == 2
    same = service.ensure_serving("m", "3", actor="system:serve")  # its stable: followed
    assert same.revision == 2
    pinned = service.ensure_serving("m", "1", actor="system:serve")
    assert pinned.spec.stable == "1" and pinned.spec.canary is None and pinned.revision == 3
    assert service.history("m")[-1].action == "serve"


def test_split_and_scale(service: DeploymentService) -> None:
    service.set_version("m", "1", actor="t")
    service.set_weights("m", {"1": 50, "2": 30, "3": 20}, actor="t")
    spec = service.get("m").spec
    assert [(t.version, t.weight) for t in spec.targets] == [("1", 50), ("2", 30), ("3", 20)]
    with pytest.raises(InvalidRequestError, match="add up to 90"):
        service.set_weights("m", {"1": 60, "2": 30}, actor="t")
    service.scale("m", 2, version="3", actor="t")
    assert service.get("m").spec.target("3") is not None
    assert [t.replicas for t in service.get("m").spec.targets] == [1, 1, 2]
    assert len(service.list_all()) == 1


def test_concurrent_changes_serialize(service: DeploymentService) -> None:
    service.set_version("m", "1", actor="t")
    errors: list[BaseException] = []

    def scale(n: int) -> None:
        try:
            service.scale("m", n, actor=f"t{n}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=scale, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    history = service.history("m")
    assert [c.revision for c in history] == list(range(1, 10))
    for before, after in itertools.pairwise(history):
        assert after.previous == before.spec


def test_a_deployed_version_cannot_be_removed(
    service: DeploymentService, registry: RegistryService
) -> None:
    service.set_version("m", "1", actor="t")
    service.canary("m", "2", 10, actor="t")
    with pytest.raises(ConflictError, match=r"routes to version\(s\) 2"):
        registry.remove("m", "2")
    with pytest.raises(ConflictError, match=r"routes to version\(s\) 1, 2"):
        registry.remove("m")
    assert [m.version for m in registry.remove("m", "3")] == ["3"]


def test_stop_deletes_the_deployment_and_keeps_counting_revisions(
    service: DeploymentService, registry: RegistryService, governance: GovernanceService
) -> None:
    seen: list[DeploymentChange] = []
    service.on_change = seen.append
    with pytest.raises(NotFoundError, match="no deployment"):
        service.stop("m", actor="t")
    service.set_version("m", "1", actor="t")
    service.canary("m", "2", 10, actor="t")
    stopped = service.stop("m", actor="cli:alice", reason="retired")
    assert (stopped.action, stopped.revision, stopped.spec) == ("stop", 3, {})
    assert stopped.previous is not None and stopped.previous["canary"] == "2"
    assert seen[-1] == stopped
    with pytest.raises(NotFoundError):
        service.get("m")
    assert service.list_all() == [] and "m" not in registry.deployments.revisions()
    assert service.stopped() == {"m"}
    audit = governance.list_audit(target="m")
    assert audit[0].action == "deployment.stop" and audit[0].actor == "cli:alice"
    assert governance.verify_audit().ok
    # Its versions are free to remove; a new deployment continues the revisions.
    assert [m.version for m in registry.remove("m", "3")] == ["3"]
    again = service.set_version("m", "2", actor="t")
    assert again.revision == 4 and again.previous is None
    assert service.stopped() == set()
    assert [c.revision for c in service.history("m")] == [1, 2, 3, 4]
    # The rollback target skips the stop: the stable version before it.
    assert service.rollback("m", actor="t") is not None
    assert service.get("m").spec.stable == "1"


def test_a_server_of_the_whole_store_leaves_stopped_names_stopped(
    service: DeploymentService, registry: RegistryService
) -> None:
    service.set_version("m", "2", actor="t")
    service.stop("m", actor="t")
    latest = [registry.get("m")]
    built: list[tuple[str, str]] = []

    def version_deployment(name: str, version: str) -> Any:
        built.append((name, version))
        return (name, version)

    whole_store = plan_serving(service, latest, [], version_deployment)
    assert whole_store.specs == {} and built == [] and service.stopped() == {"m"}
    named = plan_serving(service, latest, ["m"], version_deployment)  # --model m: serve it
    assert named.specs["m"].stable == "3" and built == [("m", "3")]
    assert service.history("m")[-1].action == "serve"


def test_gateways_exchange_canary_windows_and_the_guard_pools_them(
    service: DeploymentService,
) -> None:
    store = service.registry.deployments
    guard = CanaryGuard(GuardConfig(min_requests=20))

    def window(requests: int, errors: int) -> dict[str, Any]:
        return WindowCounts(requests, errors, {100: requests - errors}).to_dict()

    def trial() -> CanaryTrial:  # this gateway's own windows travel in the rows
        return CanaryTrial("m", "1", "2", WindowCounts(), WindowCounts())

    # Each gateway saw 12 canary requests, all failing: too few alone, 24 together.
    a = [VersionWindow("a", "m", "1", window(30, 0)), VersionWindow("a", "m", "2", window(12, 12))]
    only_a = store.exchange_windows("a", a, fresh_s=5)
    assert sorted((r.gateway, r.version) for r in only_a) == [("a", "1"), ("a", "2")]
    assert pooled_verdicts(guard, [trial()], only_a) == []
    b = [VersionWindow("b", "m", "1", window(30, 0)), VersionWindow("b", "m", "2", window(12, 12))]
    both = store.exchange_windows("b", b, fresh_s=5)
    ((name, canary, reason),) = pooled_verdicts(guard, [trial()], both)
    assert (name, canary) == ("m", "2")
    assert "error rate 100.0% (24/24)" in reason and "pooled over 2 gateways" in reason
    # A gateway's new windows replace its old ones; withdrawing leaves the others'.
    again = store.exchange_windows("a", a[:1], fresh_s=5)
    assert sorted((r.gateway, r.version) for r in again) == [("a", "1"), ("b", "1"), ("b", "2")]
    assert store.exchange_windows("b", [], fresh_s=5) == []
    assert [(r.gateway, r.version) for r in store.exchange_windows("a", a[:1], 5)] == [("a", "1")]
    # Rows older than fresh_s do not count.
    store.exchange_windows("c", [VersionWindow("c", "x", "1", window(1, 0))], 5)
    time.sleep(0.05)
    fresh = store.exchange_windows("d", [VersionWindow("d", "x", "1", window(1, 0))], 0.02)
    assert [r.gateway for r in fresh] == ["d"]


def test_a_followed_alias_moves_the_deployment_in_its_transaction(
    registry: RegistryService,
    make_model_dir: MakeModelDir,
    governance: GovernanceService,
    home: Path,
    database_url: str,
) -> None:
    src = make_model_dir()
    for _ in range(3):
        registry.import_model(str(src), name="m")
    hooks = chain_alias_hooks(alias_follower(audit_deployment_change), governance.audit_alias_move)
    with RegistryService(home, database_url, offline=True, alias_audit=hooks) as hooked:
        service = DeploymentService(hooked, audit=audit_deployment_change)
        hooked.set_alias("m", "production", "1", actor="cli:alice")
        service.follow_alias("m", "production", replicas=2, actor="cli:alice")
        hooked.set_alias("m", "production", "3", actor="lmaas-k1")
        view = service.get("m")
        assert (view.spec.stable, view.spec.follow, view.revision) == ("3", "production", 2)
        assert view.spec.target("3") is not None and view.spec.target("3").replicas == 2  # type: ignore[union-attr]
        last = service.history("m")[-1]
        assert (last.action, last.actor, last.reason) == (
            "follow", "lmaas-k1", "m@production moved 1 -> 3",
        )  # fmt: skip
        service.canary("m", "2", 10, actor="cli:alice")
        with pytest.raises(ConflictError, match="has canary 2 on trial"):
            hooked.set_alias("m", "production", "1", actor="lmaas-k1")
        assert hooked.alias_target("m", "production") == "3"  # the move was undone with it
        hooked.set_alias("m", "staging", "1")  # another alias: the deployment does not move
        service.rollback("m", actor="cli:alice")
        hooked.remove_alias("m", "production", actor="lmaas-k1")
        view = service.get("m")
        assert (view.spec.stable, view.spec.follow) == ("3", None)
        actions = [c.action for c in service.history("m")]
        assert actions == ["set", "follow", "canary", "rollback", "unfollow"]
    audit = [r.action for r in reversed(governance.list_audit(target="m"))]
    assert audit.count("deployment.follow") == 1 and audit.count("deployment.unfollow") == 1
    assert audit.index("deployment.follow") < audit.index("deployment.canary")
    assert governance.verify_audit().ok


def test_gateways_publish_what_they_applied(service: DeploymentService) -> None:
    store = service.registry.deployments
    store.publish_fleet("a", {"*": {"follows": None}, "m": {"revision": 1}})
    store.publish_fleet("b", {"*": {"follows": ["m"]}})
    assert {(r.gateway, r.name) for r in store.fleet(60)} == {("a", "*"), ("a", "m"), ("b", "*")}
    store.publish_fleet("a", {"*": {"follows": None}})  # replaces a's rows
    assert {(r.gateway, r.name) for r in store.fleet(60)} == {("a", "*"), ("b", "*")}
    store.publish_fleet("b", {})
    assert [r.gateway for r in store.fleet(60)] == ["a"] and store.fleet(0) == []
    service.set_version("m", "1", actor="cli:alice")
    status = service.fleet("m", 60)
    assert (status.revision, status.stopped, len(status.gateways)) == (1, False, 1)
    assert not status.done  # a has not reported m yet
