"""``/admin/deployments``: what each served name routes to, canaries, promotion through the
gate, rollback, scaling, and the history of every change (admin scope, checked by the auth
middleware for the whole ``/admin`` prefix).

Changes are written to the metadata DB (with their history and audit rows) and applied by this
gateway at once; other gateways sharing the DB apply them within ``deploy.poll_interval_s``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from lmaas.api.services import actor_of, services_of
from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.engine.deploy import MAX_REPLICAS
from lmaas.lifecycle.deployments import DeploymentService, DeploymentView
from lmaas.registry.deployments_db import DeploymentChange

router = APIRouter(prefix="/admin/deployments", tags=["admin"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1000, description="Recorded in the history.")


class SetBody(_Body):
    """All traffic to one version, or an explicit split."""

    version: str | None = Field(
        default=None,
        max_length=130,
        description="A version or alias (resolved once: pinned); drops any canary.",
    )
    follow: str | None = Field(
        default=None,
        max_length=64,
        description="An alias: deploy the version it names, and again each time it moves.",
    )
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS)
    weights: dict[str, int] | None = Field(
        default=None, description='An explicit split instead, e.g. {"3": 90, "4": 10}.'
    )


class CanaryBody(_Body):
    version: str = Field(max_length=130, description="The version (or alias) to try.")
    percent: int = Field(ge=1, le=99, description="Share of the traffic it gets.")
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS)


class PromoteBody(_Body):
    force: bool = Field(default=False, description="Promote even when the gate refuses.")
    max_drop: float | None = Field(
        default=None, ge=0, description="The gate's margin (default: the server's setting)."
    )


class ScaleBody(_Body):
    replicas: int = Field(ge=1, le=MAX_REPLICAS)
    version: str | None = Field(default=None, max_length=130, description="Default: stable.")


class TargetResponse(BaseModel):
    version: str
    weight: int
    replicas: int


class DeploymentResponse(BaseModel):
    """A stored deployment, and what this gateway serves for it (``live``)."""

    object: Literal["deployment"] = "deployment"
    name: str
    revision: int
    stable: str
    canary: str | None
    follow: str | None = Field(default=None, description="The alias the deployment follows.")
    targets: list[TargetResponse]
    updated_at: datetime
    updated_by: str
    live: dict[str, Any] | None = Field(
        default=None, description="Replicas, their states and the canary window, when served here."
    )
    gate: dict[str, Any] | None = Field(default=None, description="The promotion gate's verdict.")
    fleet: dict[str, Any] | None = Field(
        default=None,
        description="What every live gateway on the DB has applied of the current revision "
        "(revision, done, per gateway: revision, ready/wanted replicas per version, error).",
    )

    @classmethod
    def of(cls, view: DeploymentView, service: DeploymentService) -> DeploymentResponse:
        spec = view.spec
        return cls(
            name=spec.name,
            revision=view.revision,
            stable=spec.stable,
            canary=spec.canary,
            follow=spec.follow,
            targets=[
                TargetResponse(version=t.version, weight=t.weight, replicas=t.replicas)
                for t in spec.targets
            ],
            updated_at=view.updated_at,
            updated_by=view.updated_by,
            live=service.live(spec.name) if service.live is not None else None,
        )


class DeploymentListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeploymentResponse]


class ChangeResponse(BaseModel):
    revision: int
    action: str
    spec: dict[str, Any]
    previous: dict[str, Any] | None
    actor: str
    reason: str
    changed_at: datetime

    @classmethod
    def of(cls, change: DeploymentChange) -> ChangeResponse:
        return cls(
            revision=change.revision,
            action=change.action,
            spec=change.spec,
            previous=change.previous,
            actor=change.actor,
            reason=change.reason,
            changed_at=change.changed_at,
        )


class HistoryResponse(BaseModel):
    object: Literal["list"] = "list"
    name: str
    data: list[ChangeResponse]


def _service(request: Request) -> DeploymentService:
    service = services_of(request).deployments
    if service is None:
        raise NotSupportedError("deployments are not configured on this server")
    return service


def _current(service: DeploymentService, name: str) -> DeploymentResponse:
    return DeploymentResponse.of(service.get(name), service)


@router.get("/{name}/fleet")
def deployment_fleet(name: str, request: Request) -> dict[str, Any]:
    """What every live gateway has applied of the name's current revision (or of its stop)."""
    return _service(request).fleet(name).to_dict()


@router.get("")
def list_deployments(request: Request) -> DeploymentListResponse:
    """Every stored deployment."""
    service = _service(request)
    return DeploymentListResponse(
        data=[DeploymentResponse.of(v, service) for v in service.list_all()]
    )


@router.get("/{name}")
def get_deployment(name: str, request: Request) -> DeploymentResponse:
    """One deployment (404 when the name has none), with ``fleet``: how far every live
    gateway is with its current revision."""
    service = _service(request)
    response = _current(service, name)
    response.fleet = service.fleet(name).to_dict()
    return response


@router.get("/{name}/history")
def deployment_history(name: str, request: Request, limit: int = 1000) -> HistoryResponse:
    """Every change of the deployment, oldest first."""
    changes = _service(request).history(name, max(1, min(limit, 10_000)))
    return HistoryResponse(name=name, data=[ChangeResponse.of(c) for c in changes])


@router.put("/{name}")
def set_deployment(name: str, body: SetBody, request: Request) -> DeploymentResponse:
    """Deploy one version with all the traffic (``version``), or an explicit split
    (``weights``); the replicas that leave drain before they stop."""
    service, actor = _service(request), actor_of(request)
    if sum(x is not None for x in (body.weights, body.version, body.follow)) > 1:
        raise InvalidRequestError("give one of version, follow or weights", param="version")
    if body.weights is not None:
        service.set_weights(name, body.weights, actor=actor, reason=body.reason)
    elif body.follow is not None:
        service.follow_alias(
            name, body.follow, replicas=body.replicas, actor=actor, reason=body.reason
        )
    elif body.version is not None:
        service.set_version(
            name, body.version, replicas=body.replicas, actor=actor, reason=body.reason
        )
    elif body.replicas is not None:
        service.scale(name, body.replicas, actor=actor, reason=body.reason)
    else:
        raise InvalidRequestError("give version, follow, weights or replicas", param="version")
    return _current(service, name)


@router.post("/{name}/canary")
def start_canary(name: str, body: CanaryBody, request: Request) -> DeploymentResponse:
    """Send ``percent`` of the traffic to ``version`` beside the stable version."""
    service = _service(request)
    service.canary(
        name,
        body.version,
        body.percent,
        replicas=body.replicas,
        actor=actor_of(request),
        reason=body.reason,
    )
    return _current(service, name)


@router.post("/{name}/promote")
def promote(name: str, request: Request, body: PromoteBody | None = None) -> DeploymentResponse:
    """Make the canary stable; 409 ``gate_refused`` when its stored evaluation is worse than
    the stable version's by more than the margin (unless ``force``)."""
    body = body or PromoteBody()
    service = _service(request)
    _, gate = service.promote(
        name, actor=actor_of(request), force=body.force, max_drop=body.max_drop, reason=body.reason
    )
    response = _current(service, name)
    response.gate = gate.to_dict()
    return response


@router.post("/{name}/rollback")
def rollback(name: str, request: Request, body: _Body | None = None) -> DeploymentResponse:
    """Drop the canary (all traffic back to stable); without a canary, go back to the previous
    stable version."""
    service = _service(request)
    service.rollback(name, actor=actor_of(request), reason=(body or _Body()).reason)
    return _current(service, name)


@router.delete("/{name}")
def stop_deployment(name: str, request: Request, body: _Body | None = None) -> ChangeResponse:
    """Stop serving ``name``: the deployment is deleted (its history stays), every gateway
    drains and stops its replicas; ``PUT`` serves it again."""
    change = _service(request).stop(name, actor=actor_of(request), reason=(body or _Body()).reason)
    return ChangeResponse.of(change)


@router.post("/{name}/scale")
def scale(name: str, body: ScaleBody, request: Request) -> DeploymentResponse:
    """Run ``replicas`` worker processes for ``version`` (default: the stable one)."""
    service = _service(request)
    service.scale(
        name, body.replicas, version=body.version, actor=actor_of(request), reason=body.reason
    )
    return _current(service, name)
