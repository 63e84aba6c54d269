"""Deployment operations: set the stable version, canary, promote (through the gate), roll back,
scale, split, stop. The CLI (``lmaas deploy``), the admin API (``/admin/deployments``) and the
gateway's canary guard all change deployments through :class:`DeploymentService`.

Each operation is one transaction of the registry's
:class:`~lmaas.registry.deployments_db.DeploymentStore`: the row is locked, the next
:class:`~lmaas.engine.deploy.DeploymentSpec` computed from the current one, and the change
written with its history row (and its audit row, through the ``audit`` hook). Running gateways
poll the revisions and apply the change (``lmaas.bootstrap.deployments``); ``on_change`` lets
the gateway that made the change apply it at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from lmaas.core.errors import GateRefusedError, InvalidRequestError, NotFoundError
from lmaas.core.types import is_valid_name
from lmaas.engine import deploy
from lmaas.engine.deploy import DeploymentSpec, GateResult
from lmaas.registry.deployments_db import (
    FLEET_GATEWAY_ROW,
    DeploymentChange,
    DeploymentStore,
    FleetRow,
    InTransaction,
    SpecJson,
)
from lmaas.registry.lifecycle_db import AliasInTransaction, AliasMove
from lmaas.registry.service import RegistryService

DEFAULT_MAX_METRIC_DROP = 0.01
"""Largest drop of a stored metric (absolute) the promotion gate lets through by default."""


@dataclass(slots=True, frozen=True)
class DeploymentView:
    """A stored deployment."""

    spec: DeploymentSpec
    revision: int
    updated_at: datetime
    updated_by: str

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "revision": self.revision,
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
        }


FLEET_FRESH_FACTOR = 3.0
"""A gateway counts as live while its last fleet report is younger than this many heartbeats."""


@dataclass(slots=True, frozen=True)
class GatewayProgress:
    """One live gateway that serves a name: what it has applied of it.

    Attributes:
        gateway: ``host:pid:id`` of the gateway.
        revision: The revision it routes now (0: none, e.g. still loading a new name).
        versions: Version → (ready replicas, wanted replicas) of what it routes.
        error: Why it could not apply the target revision (or a later one); None when it did
            or is still trying.
        done: It routes the target revision (or a later one) with every replica ready; for a
            stopped name: it no longer serves it.
        retry: With ``error``: the gateway's tries of the failed revision (``attempts``,
            ``next_retry_at``), when it tries again.
    """

    gateway: str
    revision: int
    versions: dict[str, tuple[int, int]]
    error: str | None
    done: bool
    retry: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "revision": self.revision,
            "versions": {v: {"ready": r, "replicas": w} for v, (r, w) in self.versions.items()},
            "error": self.error,
            "done": self.done,
            "retry": self.retry,
        }

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.gateway}: failed: {self.error}{describe_retry(self.retry)}"
        parts = ", ".join(f"{v} {r}/{w} ready" for v, (r, w) in self.versions.items())
        state = "done" if self.done else "applying"
        return f"{self.gateway}: revision {self.revision} ({parts or 'nothing routed'}), {state}"


@dataclass(slots=True, frozen=True)
class FleetStatus:
    """Whether the live gateways serving a name have applied its revision ``revision``."""

    name: str
    revision: int
    stopped: bool
    gateways: tuple[GatewayProgress, ...]

    @property
    def done(self) -> bool:
        """Every live gateway serving the name has applied it (True with no such gateway)."""
        return all(g.done for g in self.gateways)

    @property
    def errors(self) -> list[str]:
        return [f"{g.gateway}: {g.error}" for g in self.gateways if g.error is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "stopped": self.stopped,
            "done": self.done,
            "gateways": [g.to_dict() for g in self.gateways],
        }


def describe_retry(retry: dict[str, Any] | None) -> str:
    """`` (failed 2 times, next try at 23:41:07 UTC)`` for a fleet row's ``retry``."""
    if not retry:
        return ""
    at = str(retry.get("next_retry_at", ""))
    with contextlib.suppress(ValueError):
        at = datetime.fromisoformat(at).astimezone(UTC).strftime("%H:%M:%S UTC")
    return f" (failed {retry.get('attempts')} time(s), next try at {at})"


def fleet_status(name: str, revision: int, stopped: bool, rows: list[FleetRow]) -> FleetStatus:
    """The progress of each live gateway (one with a fresh heartbeat row in ``rows``) that
    serves ``name`` towards its revision ``revision`` (or, ``stopped``, towards not serving
    it)."""
    reports = {(r.gateway, r.name): r.report for r in rows}
    found: list[GatewayProgress] = []
    for row in rows:
        if row.name != FLEET_GATEWAY_ROW:
            continue
        follows = row.report.get("follows")
        report = reports.get((row.gateway, name))
        if follows is not None and name not in follows and report is None:
            continue  # a gateway started for other names
        report = report or {}
        applied = int(report.get("revision") or 0)
        versions = {
            str(v): (int(c.get("ready", 0)), int(c.get("replicas", 0)))
            for v, c in dict(report.get("versions") or {}).items()
        }
        failed = report.get("failed_revision")
        error = (
            str(report.get("error"))
            if failed is not None and int(failed) >= revision and not stopped
            else None
        )
        retry = report.get("retry") if error is not None else None
        if stopped:
            done = applied == 0 and not versions
        else:
            done = (
                applied >= revision
                and bool(versions)
                and all(ready >= wanted for ready, wanted in versions.values())
            )
        found.append(GatewayProgress(row.gateway, applied, versions, error, done, retry))
    return FleetStatus(name, revision, stopped, tuple(found))


class DeploymentService:
    """Deployment changes over the registry, with the promotion gate.

    Args:
        registry: Versions, their stored metrics, and the deployment store.
        max_metric_drop: The promotion gate's default margin.
        audit: Called inside each change's transaction (the audit trail appends its row there,
            so the change and its audit row commit together).
        on_change: Called after each committed change.
        fleet_fresh_s: A gateway whose last fleet report is older than this is not counted
            (:meth:`fleet`).
    """

    def __init__(
        self,
        registry: RegistryService,
        *,
        max_metric_drop: float = DEFAULT_MAX_METRIC_DROP,
        audit: InTransaction | None = None,
        on_change: Callable[[DeploymentChange], None] | None = None,
        fleet_fresh_s: float = 15.0,
    ) -> None:
        self.registry = registry
        self.fleet_fresh_s = fleet_fresh_s
        self.max_metric_drop = max_metric_drop
        self._audit = audit
        self.on_change = on_change
        self.live: Callable[[str], dict[str, Any] | None] | None = None
        """What a gateway serves now for a name (set by the gateway that owns this service)."""

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> DeploymentView:
        """Raises: NotFoundError when ``name`` has no deployment."""
        stored = self.registry.deployments.get(name)
        if stored is None:
            raise NotFoundError(
                f"model {name!r} has no deployment; create one with `lmaas deploy {name} "
                "--version V`",
                param="name",
            )
        return DeploymentView(
            DeploymentSpec.from_dict(stored.spec),
            stored.revision,
            stored.updated_at,
            stored.updated_by,
        )

    def list_all(self) -> list[DeploymentView]:
        return [
            DeploymentView(DeploymentSpec.from_dict(s.spec), s.revision, s.updated_at, s.updated_by)
            for s in self.registry.deployments.list_all()
        ]

    def history(self, name: str, limit: int = 1000) -> list[DeploymentChange]:
        return self.registry.deployments.history(name, limit)

    def fleet(self, name: str, fresh_s: float | None = None) -> FleetStatus:
        """How far the live gateways (fleet reports younger than ``fresh_s``, default
        ``fleet_fresh_s``) are with the
        current revision of ``name`` (or with stopping it, after a ``stop``).

        Raises:
            NotFoundError: ``name`` was never deployed.
        """
        stored = self.registry.deployments.get(name)
        if stored is not None:
            revision, stopped = stored.revision, False
        else:
            last = self.history(name, limit=1)
            if not last:
                self._require(name, None)
            revision, stopped = last[-1].revision, True
        rows = self.registry.deployments.fleet(self.fleet_fresh_s if fresh_s is None else fresh_s)
        return fleet_status(name, revision, stopped, rows)

    # ------------------------------------------------------------------ changes

    def set_version(
        self,
        name: str,
        version: str,
        *,
        replicas: int | None = None,
        actor: str,
        reason: str = "",
        action: str = "set",
    ) -> DeploymentChange:
        """All traffic to ``version`` (a version or an alias of ``name``, resolved once: the
        deployment is pinned to it); drops any canary and stops following an alias."""
        resolved = self.resolve_version(name, version)

        def compute(current: SpecJson | None) -> SpecJson:
            spec = None if current is None else DeploymentSpec.from_dict(current)
            return deploy.set_stable(spec, name, resolved, replicas).to_dict()

        return self._change(name, action, compute, actor, reason)

    def follow_alias(
        self,
        name: str,
        alias: str,
        *,
        replicas: int | None = None,
        actor: str,
        reason: str = "",
    ) -> DeploymentChange:
        """All traffic to the version ``name@alias`` names now, and from now on to the version
        it is moved to (each move is a ``follow`` change in the same transaction as the move,
        :func:`alias_follower`); drops any canary.

        Raises:
            ModelNotFoundError: No such alias. InvalidRequestError: ``latest`` (built in, it
            never moves through an alias move).
        """
        alias = alias.removeprefix(f"{name}@").removeprefix("@")
        if alias == "latest" or not is_valid_name(alias) or alias.isdigit():
            raise InvalidRequestError(
                f"cannot follow {name}@{alias}: give an alias set with `lmaas models alias`",
                param="follow",
            )
        resolved = self.registry.resolve(f"{name}@{alias}").version

        def compute(current: SpecJson | None) -> SpecJson:
            spec = None if current is None else DeploymentSpec.from_dict(current)
            return deploy.set_stable(spec, name, resolved, replicas, follow=alias).to_dict()

        return self._change(name, "set", compute, actor, reason or f"follows {name}@{alias}")

    def canary(
        self,
        name: str,
        version: str,
        percent: int,
        *,
        replicas: int | None = None,
        actor: str,
        reason: str = "",
    ) -> DeploymentChange:
        """Send ``percent`` of ``name``'s traffic to ``version`` beside the stable version."""
        resolved = self.resolve_version(name, version)

        def compute(current: SpecJson | None) -> SpecJson:
            spec = self._require(name, current)
            return deploy.with_canary(spec, resolved, percent, replicas).to_dict()

        return self._change(name, "canary", compute, actor, reason)

    def promote(
        self,
        name: str,
        *,
        actor: str,
        force: bool = False,
        max_drop: float | None = None,
        reason: str = "",
    ) -> tuple[DeploymentChange, GateResult]:
        """Make the canary the stable version, unless the gate refuses it.

        Raises:
            GateRefusedError: The canary's stored evaluation is worse than the stable's by more
                than the margin (``force`` promotes anyway; the history says so).
            ConflictError: There is no canary.
        """
        margin = self.max_metric_drop if max_drop is None else max_drop
        gates: list[GateResult] = []

        def compute(current: SpecJson | None) -> SpecJson:
            spec = self._require(name, current)
            after = deploy.promoted(spec)  # raises when there is no canary
            assert spec.canary is not None
            gate = self.gate(name, spec.stable, spec.canary, margin)
            gates.append(gate)
            if not gate.passed and not force:
                raise GateRefusedError(
                    f"promotion of {name}:{spec.canary} refused: "
                    + "; ".join(gate.reasons)
                    + " (promote with --force to override)"
                )
            return after.to_dict()

        change = self._change(name, "promote", compute, actor, reason, gates=gates, force=force)
        return change, gates[-1]

    def rollback(
        self,
        name: str,
        *,
        actor: str,
        reason: str = "",
        action: str = "rollback",
        only_canary: str | None = None,
    ) -> DeploymentChange | None:
        """Drop the canary; without one, return to the previous stable version.

        ``only_canary`` (the automatic rollback): act only while that version is still the
        canary, else change nothing and return None.
        """
        previous = self._previous_stable(name)

        def compute(current: SpecJson | None) -> SpecJson | None:
            spec = self._require(name, current)
            if only_canary is not None and spec.canary != only_canary:
                return None
            return deploy.rolled_back(spec, previous).to_dict()

        return self._change_or_none(name, action, compute, actor, reason)

    def scale(
        self,
        name: str,
        replicas: int,
        *,
        version: str | None = None,
        actor: str,
        reason: str = "",
    ) -> DeploymentChange:
        """Run ``replicas`` workers for ``version`` (default: the stable one)."""
        resolved = None if version is None else self.resolve_version(name, version)

        def compute(current: SpecJson | None) -> SpecJson:
            spec = self._require(name, current)
            return deploy.scaled(spec, resolved, replicas).to_dict()

        return self._change(name, "scale", compute, actor, reason)

    def set_weights(
        self, name: str, weights: Mapping[str, int], *, actor: str, reason: str = ""
    ) -> DeploymentChange:
        """An explicit traffic split between versions (weights add up to 100)."""
        resolved = {self.resolve_version(name, v): w for v, w in weights.items()}

        def compute(current: SpecJson | None) -> SpecJson:
            spec = self._require(name, current)
            return deploy.with_weights(spec, resolved).to_dict()

        return self._change(name, "weights", compute, actor, reason)

    def stop(self, name: str, *, actor: str, reason: str = "") -> DeploymentChange:
        """Stop serving ``name``: the deployment is deleted (its history stays), gateways drain
        and stop its replicas, and its versions may be removed. ``lmaas deploy NAME --version V``
        serves it again.

        Raises:
            NotFoundError: ``name`` has no deployment.
        """
        change = self.registry.deployments.stop(
            name, actor=actor, reason=reason, in_transaction=self._audit
        )
        if change is None:
            self._require(name, None)  # raises the 404
            raise AssertionError("unreachable")
        if self.on_change is not None:
            self.on_change(change)
        return change

    def stopped(self) -> set[str]:
        """Names whose deployment was stopped (a server serving the whole store skips them)."""
        return self.registry.deployments.stopped()

    def ensure_serving(self, name: str, version: str | None, *, actor: str) -> DeploymentView:
        """What a starting server serves for ``name``: the stored deployment when ``version`` is
        None or is its stable version; otherwise (or with none stored) ``version`` (default: the
        latest) alone, recorded as a ``serve`` change."""

        def compute(current: SpecJson | None) -> SpecJson | None:
            if current is not None:
                spec = DeploymentSpec.from_dict(current)
                if version is None or spec.stable == version:
                    return None
            chosen = version or self.registry.get(name).version
            return deploy.single(name, chosen).to_dict()

        self._change_or_none(name, "serve", compute, actor, "lmaas serve")
        return self.get(name)

    # ------------------------------------------------------------------ gate

    def gate(self, name: str, stable: str, canary: str, max_drop: float) -> GateResult:
        """Compare the stored evaluations of two versions (the promotion gate)."""
        return deploy.promotion_gate(
            self._metrics(name, stable),
            self._metrics(name, canary),
            max_drop,
            stable_version=f"{name}:{stable}",
            canary_version=f"{name}:{canary}",
        )

    def _metrics(self, name: str, version: str) -> dict[deploy.MetricKey, float]:
        manifest = self.registry.get(name, version)
        rows = self.registry.metrics(manifest)
        return deploy.latest_metrics((m.metric, m.dataset_digest, m.split, m.value) for m in rows)

    # ------------------------------------------------------------------ helpers

    def resolve_version(self, name: str, ref: str) -> str:
        """A version of ``name`` given as ``3``, ``name:3``, an alias, ``@alias`` or
        ``name@alias``.

        Raises:
            ModelNotFoundError: No such version or alias.
        """
        ref = ref.removeprefix(f"{name}:")
        if ref.startswith("@") or ref.startswith(f"{name}@"):
            return self.registry.resolve(f"{name}@{ref.partition('@')[2]}").version
        if not is_valid_name(ref):
            raise InvalidRequestError(f"invalid version {ref!r}", param="version")
        if not ref.isdigit() and self.registry.alias_target(name, ref) is not None:
            return self.registry.resolve(f"{name}@{ref}").version
        return self.registry.get(name, ref).version

    def _previous_stable(self, name: str) -> str | None:
        history = self.history(name)
        if not history:
            return None
        current = history[-1].spec.get("stable")
        for change in reversed(history):
            stable = change.spec.get("stable")  # a ``stop`` change has none
            if stable is not None and stable != current:
                return str(stable)
        return None

    @staticmethod
    def _require(name: str, current: SpecJson | None) -> DeploymentSpec:
        if current is None:
            raise NotFoundError(
                f"model {name!r} has no deployment; create one with `lmaas deploy {name} "
                "--version V`",
                param="name",
            )
        return DeploymentSpec.from_dict(current)

    def _change(
        self,
        name: str,
        action: str,
        compute: Callable[[SpecJson | None], SpecJson],
        actor: str,
        reason: str,
        *,
        gates: list[GateResult] | None = None,
        force: bool = False,
    ) -> DeploymentChange:
        change = self._change_or_none(name, action, compute, actor, reason, gates, force)
        assert change is not None
        return change

    def _change_or_none(
        self,
        name: str,
        action: str,
        compute: Callable[[SpecJson | None], SpecJson | None],
        actor: str,
        reason: str,
        gates: list[GateResult] | None = None,
        force: bool = False,
    ) -> DeploymentChange | None:
        def full_reason() -> str:  # the gate runs inside compute: its verdict joins the reason
            return reason if not gates else _gate_note(gates[-1], force, reason)

        change = self.registry.deployments.change(
            name, action, compute, actor=actor, reason=full_reason, in_transaction=self._audit
        )
        if change is not None and self.on_change is not None:
            self.on_change(change)
        return change


def alias_follower(
    audit: InTransaction | None, actor: str = "system:alias-follow"
) -> AliasInTransaction:
    """The registry's alias-move hook that moves the deployment following the alias (its
    ``follow`` spec field) in the move's own transaction: a ``follow`` change (``unfollow``
    when the alias is removed) with its history row and, through ``audit``, its audit row. A
    move refused by :func:`lmaas.engine.deploy.followed` (a canary on trial) raises, which
    undoes the alias move too. The change's actor is the move's (``actor`` when it names
    none)."""

    def hook(session: Session, move: AliasMove) -> None:
        def compute(current: SpecJson | None) -> SpecJson | None:
            if current is None or current.get("follow") != move.alias:
                return None
            after = deploy.followed(DeploymentSpec.from_dict(current), move.alias, move.version)
            return None if after is None else after.to_dict()

        action = "follow" if move.version is not None else "unfollow"
        was = move.previous_version or "none"
        reason = (
            f"{move.name}@{move.alias} moved {was} -> {move.version}"
            if move.version is not None
            else f"{move.name}@{move.alias} removed (was {was}); the deployment stays pinned"
        )
        DeploymentStore.change_in(
            session,
            move.name,
            action,
            compute,
            actor=move.actor or actor,
            reason=reason,
            in_transaction=audit,
        )

    return hook


def chain_alias_hooks(*hooks: AliasInTransaction | None) -> AliasInTransaction:
    """One alias-move hook that calls ``hooks`` in order (None ones skipped)."""
    present = [h for h in hooks if h is not None]

    def hook(session: Session, move: AliasMove) -> None:
        for each in present:
            each(session, move)

    return hook


def _gate_note(gate: GateResult, force: bool, reason: str) -> str:
    parts = [reason] if reason else []
    if gate.passed:
        parts.append(f"gate passed ({len(gate.compared)} shared metrics)")
    elif force:
        parts.append("gate refused, promoted with --force: " + "; ".join(gate.reasons))
    return "; ".join(parts)
