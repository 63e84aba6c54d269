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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lmaas.core.errors import GateRefusedError, InvalidRequestError, NotFoundError
from lmaas.core.types import is_valid_name
from lmaas.engine import deploy
from lmaas.engine.deploy import DeploymentSpec, GateResult
from lmaas.registry.deployments_db import DeploymentChange, InTransaction, SpecJson
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


class DeploymentService:
    """Deployment changes over the registry, with the promotion gate.

    Args:
        registry: Versions, their stored metrics, and the deployment store.
        max_metric_drop: The promotion gate's default margin.
        audit: Called inside each change's transaction (the audit trail appends its row there,
            so the change and its audit row commit together).
        on_change: Called after each committed change.
    """

    def __init__(
        self,
        registry: RegistryService,
        *,
        max_metric_drop: float = DEFAULT_MAX_METRIC_DROP,
        audit: InTransaction | None = None,
        on_change: Callable[[DeploymentChange], None] | None = None,
    ) -> None:
        self.registry = registry
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
        """All traffic to ``version`` (a version or an alias of ``name``); drops any canary."""
        resolved = self.resolve_version(name, version)

        def compute(current: SpecJson | None) -> SpecJson:
            spec = None if current is None else DeploymentSpec.from_dict(current)
            return deploy.set_stable(spec, name, resolved, replicas).to_dict()

        return self._change(name, action, compute, actor, reason)

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


def _gate_note(gate: GateResult, force: bool, reason: str) -> str:
    parts = [reason] if reason else []
    if gate.passed:
        parts.append(f"gate passed ({len(gate.compared)} shared metrics)")
    elif force:
        parts.append("gate refused, promoted with --force: " + "; ".join(gate.reasons))
    return "; ".join(parts)
