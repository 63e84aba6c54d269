"""Deployments as values: which versions of a served name get traffic, with what weight and how
many replicas, and the changes operators make to them (canary, promote, rollback, scale).

Everything here is plain Python over frozen dataclasses, so the transitions and the promotion
gate are unit-tested without a DB or a worker. The registry stores a :class:`DeploymentSpec` as
JSON (:meth:`DeploymentSpec.to_dict`); the local engine applies one (``LocalEngineClient.apply``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lmaas.core.errors import ConflictError, InvalidRequestError
from lmaas.core.types import is_valid_name

MAX_REPLICAS = 16
"""Most worker processes one version may run (each holds the model in memory)."""

LOWER_IS_BETTER = frozenset({"perplexity", "nll_per_token"})
"""Stored metrics where a smaller value is the better model (the gate flips its comparison)."""


@dataclass(slots=True, frozen=True)
class VersionTarget:
    """One version of a deployment.

    Attributes:
        version: The model version.
        weight: Share of the traffic that names the model without a version (0-100; the
            weights of a deployment add up to 100).
        replicas: Worker processes serving it; requests go to the least loaded.
    """

    version: str
    weight: int
    replicas: int = 1


@dataclass(slots=True, frozen=True)
class DeploymentSpec:
    """What a served name routes to.

    Attributes:
        name: The model name clients call.
        targets: The versions with their weights and replicas (weights add up to 100).
        stable: The version rollbacks return to and gates compare against.
        canary: The version on trial, when there is one (it is also in ``targets``).
        follow: An alias of ``name`` whose moves redeploy the stable version (``lmaas deploy
            NAME --follow-alias production``); None for a pinned deployment.
    """

    name: str
    targets: tuple[VersionTarget, ...]
    stable: str
    canary: str | None = None
    follow: str | None = None

    def __post_init__(self) -> None:
        check_spec(self)

    @property
    def versions(self) -> list[str]:
        return [t.version for t in self.targets]

    def target(self, version: str) -> VersionTarget | None:
        return next((t for t in self.targets if t.version == version), None)

    def weight_of(self, version: str) -> int:
        found = self.target(version)
        return 0 if found is None else found.weight

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "stable": self.stable,
            "canary": self.canary,
            "targets": [
                {"version": t.version, "weight": t.weight, "replicas": t.replicas}
                for t in self.targets
            ],
        }
        if self.follow is not None:  # absent for a pinned deployment (older rows read alike)
            data["follow"] = self.follow
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentSpec:
        targets = tuple(
            VersionTarget(str(t["version"]), int(t["weight"]), int(t.get("replicas", 1)))
            for t in data["targets"]
        )
        canary, follow = data.get("canary"), data.get("follow")
        return cls(
            str(data["name"]),
            targets,
            str(data["stable"]),
            canary and str(canary),
            follow and str(follow),
        )


def check_spec(spec: DeploymentSpec) -> None:
    """Raises: InvalidRequestError when the spec cannot be served as it stands."""
    if not spec.targets:
        raise InvalidRequestError(f"deployment {spec.name} has no version", param="targets")
    versions = [t.version for t in spec.targets]
    if len(set(versions)) != len(versions):
        raise InvalidRequestError(f"a version is listed twice: {versions}", param="targets")
    for t in spec.targets:
        if not is_valid_name(t.version):
            raise InvalidRequestError(f"invalid version {t.version!r}", param="version")
        if not 0 <= t.weight <= 100:
            raise InvalidRequestError(
                f"weight of version {t.version} is {t.weight}; weights are 0-100", param="weight"
            )
        if not 1 <= t.replicas <= MAX_REPLICAS:
            raise InvalidRequestError(
                f"version {t.version} asks for {t.replicas} replicas; 1-{MAX_REPLICAS} allowed",
                param="replicas",
            )
    total = sum(t.weight for t in spec.targets)
    if total != 100:
        raise InvalidRequestError(
            f"the weights of deployment {spec.name} add up to {total}, not 100", param="weight"
        )
    if spec.stable not in versions:
        raise InvalidRequestError(f"stable version {spec.stable} is not deployed", param="stable")
    if spec.follow is not None and (not is_valid_name(spec.follow) or spec.follow.isdigit()):
        raise InvalidRequestError(f"invalid alias to follow {spec.follow!r}", param="follow")
    if spec.canary is not None and (spec.canary not in versions or spec.canary == spec.stable):
        raise InvalidRequestError(
            f"canary {spec.canary} must be deployed beside stable {spec.stable}", param="canary"
        )


# ---------------------------------------------------------------------- transitions


def single(name: str, version: str, replicas: int = 1) -> DeploymentSpec:
    """All traffic to one version (what ``lmaas serve --model NAME:V`` serves)."""
    return DeploymentSpec(name, (VersionTarget(version, 100, replicas),), version)


def set_stable(
    current: DeploymentSpec | None,
    name: str,
    version: str,
    replicas: int | None,
    follow: str | None = None,
) -> DeploymentSpec:
    """Deploy ``version`` alone (any canary is dropped); replicas default to the current ones.
    ``follow``: the alias the deployment follows from now on (None: pinned to ``version``)."""
    keep = replicas
    if keep is None and current is not None:
        found = current.target(version) or current.target(current.stable)
        keep = found.replicas if found is not None else 1
    return replace(single(name, version, keep or 1), follow=follow)


def followed(current: DeploymentSpec, alias: str, version: str | None) -> DeploymentSpec | None:
    """The deployment after its followed ``alias`` moved to ``version`` (None: removed): the
    new version alone with the stable's replicas (like ``set_stable``), or, on removal, the same
    versions no longer following. None when nothing changes (another alias, or the version
    already is the stable one alone).

    Raises:
        ConflictError: A canary runs: the alias move is refused (promote or roll back first),
            since changing the stable version under a trial would void its comparison.
    """
    if current.follow != alias:
        return None
    if version is None:
        return replace(current, follow=None)
    if current.canary is not None:
        raise ConflictError(
            f"deployment {current.name} follows {current.name}@{alias} and has canary "
            f"{current.canary} on trial: promote or roll back the canary first (or pin the "
            f"deployment with `lmaas deploy {current.name} --version V`)"
        )
    if current.stable == version and len(current.targets) == 1:
        return None
    return set_stable(current, current.name, version, None, follow=alias)


def with_canary(
    current: DeploymentSpec, version: str, percent: int, replicas: int | None = None
) -> DeploymentSpec:
    """Send ``percent`` of the traffic to ``version`` beside the stable version.

    Raises:
        InvalidRequestError: ``version`` is the stable one, or the percent is out of 1-99.
    """
    if version == current.stable:
        raise InvalidRequestError(
            f"version {version} is the stable version; a canary must be another", param="canary"
        )
    if not 1 <= percent <= 99:
        raise InvalidRequestError(f"canary percent {percent} is outside 1-99", param="percent")
    stable = current.target(current.stable)
    assert stable is not None
    previous = current.target(version)
    count = replicas or (previous.replicas if previous is not None else 1)
    targets = (
        VersionTarget(current.stable, 100 - percent, stable.replicas),
        VersionTarget(version, percent, count),
    )
    return DeploymentSpec(current.name, targets, current.stable, version, current.follow)


def promoted(current: DeploymentSpec) -> DeploymentSpec:
    """The canary becomes the stable version with all the traffic (and the stable's replicas).

    Raises:
        ConflictError: There is no canary to promote.
    """
    if current.canary is None:
        raise ConflictError(f"deployment {current.name} has no canary to promote")
    stable = current.target(current.stable)
    canary = current.target(current.canary)
    assert stable is not None and canary is not None
    return single(current.name, current.canary, max(stable.replicas, canary.replicas))


def rolled_back(current: DeploymentSpec, previous_stable: str | None) -> DeploymentSpec:
    """Drop the canary (all traffic back to the stable version); without a canary, return to
    ``previous_stable`` (the stable version before the last promotion or change).

    Raises:
        ConflictError: No canary and no earlier stable version to return to.
    """
    stable = current.target(current.stable)
    assert stable is not None
    if current.canary is not None:  # the stable version stays: a followed alias still is
        return replace(single(current.name, current.stable, stable.replicas), follow=current.follow)
    if previous_stable is None or previous_stable == current.stable:
        raise ConflictError(
            f"deployment {current.name} has no canary and no earlier stable version to roll back to"
        )
    return single(current.name, previous_stable, stable.replicas)


def scaled(current: DeploymentSpec, version: str | None, replicas: int) -> DeploymentSpec:
    """Set the replica count of ``version`` (default: the stable one).

    Raises:
        InvalidRequestError: The version is not deployed.
    """
    version = version or current.stable
    if current.target(version) is None:
        raise InvalidRequestError(
            f"version {version} is not deployed in {current.name}", param="version"
        )
    targets = tuple(
        replace(t, replicas=replicas) if t.version == version else t for t in current.targets
    )
    return replace(current, targets=targets)


def with_weights(current: DeploymentSpec, weights: Mapping[str, int]) -> DeploymentSpec:
    """An explicit split (``{"3": 90, "4": 10}``); versions keep their replicas (new ones: 1).
    The stable version stays when it keeps traffic, otherwise the heaviest version becomes it;
    the canary is kept only if it is still deployed."""
    targets = tuple(
        VersionTarget(v, w, (current.target(v) or VersionTarget(v, 0, 1)).replicas)
        for v, w in weights.items()
    )
    if current.stable in weights:
        stable = current.stable
    else:
        stable = max(weights.items(), key=lambda item: item[1])[0]
    canary = current.canary if current.canary in weights and current.canary != stable else None
    follow = current.follow if stable == current.stable else None
    return DeploymentSpec(current.name, targets, stable, canary, follow)


# ---------------------------------------------------------------------- gates

MetricKey = tuple[str, str, str]
"""(metric, dataset digest, split)."""


@dataclass(slots=True, frozen=True)
class GateResult:
    """What the promotion gate found comparing the canary's stored evaluation to the stable's.

    Attributes:
        passed: True when no shared metric is worse by more than the margin.
        compared: (metric, dataset digest, split, stable value, canary value) of each shared one.
        reasons: One line per failure.
    """

    passed: bool
    compared: tuple[tuple[str, str, str, float, float], ...]
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compared": [
                {"metric": m, "dataset_digest": d, "split": s, "stable": a, "canary": b}
                for m, d, s, a, b in self.compared
            ],
            "reasons": list(self.reasons),
        }


def latest_metrics(rows: Iterable[tuple[str, str, str, float]]) -> dict[MetricKey, float]:
    """The last value per (metric, dataset digest, split) of rows given oldest first."""
    found: dict[MetricKey, float] = {}
    for metric, digest, split, value in rows:
        found[(metric, digest, split)] = value
    return found


def promotion_gate(
    stable: Mapping[MetricKey, float],
    canary: Mapping[MetricKey, float],
    max_drop: float,
    *,
    stable_version: str,
    canary_version: str,
) -> GateResult:
    """Refuse a canary whose stored evaluation is worse than the stable's by more than
    ``max_drop`` (absolute, in the metric's unit) on any metric both were evaluated on with the
    same data set and split. When the stable version has stored metrics and the canary shares
    none of them, the gate refuses too (nothing shows the canary is as good); with no stored
    metric on the stable version there is nothing to hold the canary to, and the gate passes.
    """
    compared: list[tuple[str, str, str, float, float]] = []
    reasons: list[str] = []
    for key in sorted(stable.keys() & canary.keys()):
        metric, digest, split = key
        old, new = stable[key], canary[key]
        compared.append((metric, digest, split, old, new))
        drop = (new - old) if metric in LOWER_IS_BETTER else (old - new)
        if drop > max_drop + 1e-12:
            where = f"data {digest[:12]}" + (f", split {split}" if split else "")
            reasons.append(
                f"{metric} of {canary_version} is {new:.4f} against {old:.4f} for "
                f"{stable_version} ({where}): worse by {drop:.4f} > margin {max_drop:g}"
            )
    if stable and not compared:
        reasons.append(
            f"version {canary_version} has no stored evaluation on the data sets "
            f"{stable_version} was evaluated on (lmaas eval {canary_version} --data ...)"
        )
    return GateResult(not reasons, tuple(compared), tuple(reasons))
