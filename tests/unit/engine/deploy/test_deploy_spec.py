"""Deployment specs and their transitions, and the promotion gate (plain values, no DB)."""

from __future__ import annotations

import pytest

from lmaas.core.errors import ConflictError, InvalidRequestError
from lmaas.engine import deploy
from lmaas.engine.deploy import DeploymentSpec, VersionTarget


def test_single_and_round_trip() -> None:
    spec = deploy.single("m", "3", replicas=2)
    assert spec.versions == ["3"] and spec.stable == "3" and spec.canary is None
    assert spec.target("3") == VersionTarget("3", 100, 2)
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("targets", "stable", "canary", "message"),
    [
        ((), "1", None, "no version"),
        ((VersionTarget("1", 60), VersionTarget("2", 30)), "1", None, "add up to 90"),
        ((VersionTarget("1", 50), VersionTarget("1", 50)), "1", None, "listed twice"),
        ((VersionTarget("1", 100, 0),), "1", None, "replicas"),
        ((VersionTarget("1", 100, 17),), "1", None, "replicas"),
        ((VersionTarget("1", 101), VersionTarget("2", -1)), "1", None, "0-100"),
        ((VersionTarget("1", 100),), "2", None, "stable version 2"),
        ((VersionTarget("1", 100),), "1", "1", "canary"),
        ((VersionTarget("1", 100),), "1", "5", "canary"),
        ((VersionTarget("../x", 100),), "../x", None, "invalid version"),
    ],
)
def test_invalid_specs_are_refused(
    targets: tuple[VersionTarget, ...], stable: str, canary: str | None, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        DeploymentSpec("m", targets, stable, canary)


def test_canary_promote_rollback() -> None:
    stable = deploy.single("m", "1", replicas=2)
    canary = deploy.with_canary(stable, "2", 10)
    assert canary.canary == "2" and canary.stable == "1"
    assert canary.target("1") == VersionTarget("1", 90, 2)
    assert canary.target("2") == VersionTarget("2", 10, 1)
    # Re-canarying at another percent keeps the canary's replicas.
    bigger = deploy.with_canary(deploy.scaled(canary, "2", 3), "2", 25)
    assert bigger.target("2") == VersionTarget("2", 25, 3)
    promoted = deploy.promoted(canary)
    assert promoted.stable == "2" and promoted.canary is None
    assert promoted.targets == (VersionTarget("2", 100, 2),)
    assert deploy.rolled_back(canary, None) == stable
    # Without a canary, a rollback returns to the previous stable version.
    assert deploy.rolled_back(promoted, "1").targets == (VersionTarget("1", 100, 2),)


def test_transitions_refuse_what_makes_no_sense() -> None:
    stable = deploy.single("m", "1")
    with pytest.raises(InvalidRequestError, match="stable version"):
        deploy.with_canary(stable, "1", 10)
    with pytest.raises(InvalidRequestError, match="outside 1-99"):
        deploy.with_canary(stable, "2", 100)
    with pytest.raises(ConflictError, match="no canary"):
        deploy.promoted(stable)
    with pytest.raises(ConflictError, match="no canary and no earlier"):
        deploy.rolled_back(stable, None)
    with pytest.raises(ConflictError, match="no canary and no earlier"):
        deploy.rolled_back(stable, "1")
    with pytest.raises(InvalidRequestError, match="not deployed"):
        deploy.scaled(stable, "9", 2)


def test_set_stable_keeps_replicas_and_weights_pick_the_stable() -> None:
    current = deploy.with_canary(deploy.single("m", "1", 3), "2", 10)
    assert deploy.set_stable(current, "m", "2", None).targets == (VersionTarget("2", 100, 1),)
    assert deploy.set_stable(current, "m", "4", None).targets == (VersionTarget("4", 100, 3),)
    assert deploy.set_stable(None, "m", "4", 2).targets == (VersionTarget("4", 100, 2),)
    split = deploy.with_weights(current, {"1": 50, "2": 50})
    assert split.stable == "1" and split.canary == "2"
    moved = deploy.with_weights(current, {"2": 70, "5": 30})
    assert moved.stable == "2" and moved.canary is None
    assert moved.target("5") == VersionTarget("5", 30, 1)


def _key(metric: str, split: str = "test") -> deploy.MetricKey:
    return (metric, "d" * 64, split)


def test_gate_refuses_a_worse_canary_and_passes_within_the_margin() -> None:
    stable = {_key("accuracy"): 0.90, _key("f1_macro"): 0.80, _key("perplexity"): 10.0}
    close = {_key("accuracy"): 0.895, _key("f1_macro"): 0.85, _key("perplexity"): 10.005}
    result = deploy.promotion_gate(stable, close, 0.01, stable_version="m:1", canary_version="m:2")
    assert result.passed and len(result.compared) == 3 and not result.reasons
    worse = {_key("accuracy"): 0.85, _key("perplexity"): 12.0}
    result = deploy.promotion_gate(stable, worse, 0.01, stable_version="m:1", canary_version="m:2")
    assert not result.passed
    assert len(result.reasons) == 2  # accuracy dropped; perplexity (lower is better) rose
    assert "accuracy of m:2 is 0.8500 against 0.9000" in result.reasons[0]
    assert "perplexity" in result.reasons[1]
    assert result.to_dict()["passed"] is False


def test_gate_needs_shared_evaluations_when_the_stable_has_some() -> None:
    stable = {_key("accuracy"): 0.9}
    other_split = {_key("accuracy", split="dev"): 0.99}
    result = deploy.promotion_gate(
        stable, other_split, 0.01, stable_version="m:1", canary_version="m:2"
    )
    assert not result.passed and "no stored evaluation" in result.reasons[0]
    nothing = deploy.promotion_gate({}, {}, 0.01, stable_version="m:1", canary_version="m:2")
    assert nothing.passed


def test_latest_metrics_keeps_the_last_value() -> None:
    rows = [("accuracy", "d", "", 0.5), ("accuracy", "d", "", 0.7), ("accuracy", "e", "", 0.1)]
    assert deploy.latest_metrics(rows) == {("accuracy", "d", ""): 0.7, ("accuracy", "e", ""): 0.1}


def test_a_followed_alias_moves_the_stable_version_and_a_canary_holds_it() -> None:
    pinned = deploy.single("m", "1", replicas=2)
    assert "follow" not in pinned.to_dict()  # stored rows of pinned deployments stay as they were
    spec = deploy.set_stable(pinned, "m", "1", None, follow="production")
    assert spec.follow == "production" and DeploymentSpec.from_dict(spec.to_dict()) == spec
    assert deploy.followed(spec, "staging", "2") is None  # another alias
    assert deploy.followed(spec, "production", "1") is None  # already there
    moved = deploy.followed(spec, "production", "2")
    assert moved == DeploymentSpec("m", (VersionTarget("2", 100, 2),), "2", None, "production")
    unfollowed = deploy.followed(spec, "production", None)
    assert unfollowed is not None and unfollowed.follow is None and unfollowed.stable == "1"
    trial = deploy.with_canary(spec, "3", 10)
    assert trial.follow == "production"
    with pytest.raises(ConflictError, match="promote or roll back the canary first"):
        deploy.followed(trial, "production", "2")
    assert deploy.rolled_back(trial, None).follow == "production"  # the canary dropped
    assert deploy.scaled(spec, None, 3).follow == "production"
    assert deploy.promoted(trial).follow is None  # a promotion pins the deployment
    assert deploy.set_stable(spec, "m", "2", None).follow is None
    assert deploy.with_weights(spec, {"1": 80, "2": 20}).follow == "production"
    assert deploy.with_weights(spec, {"2": 100}).follow is None  # the stable changed
    with pytest.raises(InvalidRequestError, match="alias to follow"):
        DeploymentSpec("m", (VersionTarget("1", 100),), "1", None, "12")
