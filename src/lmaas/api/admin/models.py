"""``/admin/models/{name}/...``: move a model's aliases over HTTP, and read its history (admin
scope, checked by the auth middleware for the whole ``/admin`` prefix).

The same registry calls as ``lmaas models alias | unalias | history``: a move updates the alias,
appends its alias-history row and its audit row (``alias.move`` / ``alias.remove``, actor the
calling key) in one transaction. Every gateway on the metadata DB resolves ``name@alias`` to the
new version within its alias cache's lifetime (1 s).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from lmaas.api.services import actor_of, services_of
from lmaas.core.errors import ModelNotFoundError, NotSupportedError
from lmaas.registry.lifecycle_db import AliasMove
from lmaas.registry.service import RegistryService

router = APIRouter(prefix="/admin/models", tags=["admin"])


class AliasBody(BaseModel):
    """Where the alias will point."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64, description='A version, e.g. "3".')


class AliasResponse(BaseModel):
    """``name@alias`` → version."""

    object: Literal["alias"] = "alias"
    name: str
    alias: str
    version: str


class AliasListResponse(BaseModel):
    """The aliases of a model, sorted by alias (``latest`` is built in: the newest version)."""

    object: Literal["list"] = "list"
    name: str
    latest: str
    data: list[AliasResponse]


class AliasMoveResponse(BaseModel):
    """One move of an alias, as the history records it."""

    object: Literal["alias.move"] = "alias.move"
    name: str
    alias: str
    version: str | None = Field(description="The version it names now; null once removed.")
    previous_version: str | None = Field(description="The version before; null when new.")
    moved_at: datetime
    actor: str

    @classmethod
    def of(cls, move: AliasMove) -> AliasMoveResponse:
        return cls(
            name=move.name,
            alias=move.alias,
            version=move.version,
            previous_version=move.previous_version,
            moved_at=move.moved_at,
            actor=move.actor,
        )


class VersionEntry(BaseModel):
    """One version of the model, with where it came from."""

    version: str
    created_at: datetime
    task: str
    lineage: dict[str, Any] | None


class ModelHistoryResponse(BaseModel):
    """Every alias move of a model (oldest first) and its versions (by number)."""

    object: Literal["model.history"] = "model.history"
    name: str
    aliases: list[AliasMoveResponse]
    versions: list[VersionEntry]


def _registry(request: Request) -> RegistryService:
    registry = services_of(request).registry
    if registry is None:
        raise NotSupportedError("the model registry is not configured on this server")
    return registry


@router.get("/{name}/aliases")
def list_aliases(name: str, request: Request) -> AliasListResponse:
    """Every alias of ``name`` (404 when no such model)."""
    registry = _registry(request)
    latest = registry.get(name).version
    data = [
        AliasResponse(name=name, alias=alias, version=version)
        for alias, version in registry.aliases(name).items()
    ]
    return AliasListResponse(name=name, latest=latest, data=data)


@router.get("/{name}/aliases/{alias}")
def get_alias(name: str, alias: str, request: Request) -> AliasResponse:
    """The version ``name@alias`` names (404 when no such model or alias)."""
    registry = _registry(request)
    version = registry.alias_target(name, alias)
    if version is None:
        registry.get(name)  # an unknown model says so before an unknown alias
        raise ModelNotFoundError(f"model {name!r} has no alias {alias!r}", param="alias")
    return AliasResponse(name=name, alias=alias, version=version)


@router.put("/{name}/aliases/{alias}")
def move_alias(name: str, alias: str, body: AliasBody, request: Request) -> AliasMoveResponse:
    """Point ``name@alias`` at ``version`` (created if new); recorded in the alias history and
    the audit trail in the same transaction. 404 for an unknown version, 400 for an invalid
    alias (``latest`` is built in)."""
    move = _registry(request).set_alias(name, alias, body.version, actor=actor_of(request))
    return AliasMoveResponse.of(move)


@router.delete("/{name}/aliases/{alias}")
def remove_alias(name: str, alias: str, request: Request) -> AliasMoveResponse:
    """Remove ``name@alias`` (recorded as a move to no version); 404 when it does not exist."""
    move = _registry(request).remove_alias(name, alias, actor=actor_of(request))
    return AliasMoveResponse.of(move)


@router.get("/{name}/history")
def model_history(name: str, request: Request) -> ModelHistoryResponse:
    """Which version each alias named and when (oldest first), and every version with its
    lineage: what ``lmaas models history NAME`` prints. 404 for a name with neither."""
    registry = _registry(request)
    moves = registry.history(name)
    versions = [
        VersionEntry(
            version=m.version,
            created_at=m.created_at,
            task=m.task.value,
            lineage=None if m.lineage is None else m.lineage.model_dump(),
        )
        for m in registry.list_models(name)
    ]
    return ModelHistoryResponse(
        name=name, aliases=[AliasMoveResponse.of(m) for m in moves], versions=versions
    )
