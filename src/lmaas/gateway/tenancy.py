"""The engine with every request stamped with its caller's tenant and fair-share weight.

The engine queues (the LLM scheduler, the dynamic batcher) share their capacity between tenants
by weighted fair share; they learn who asks from ``tenant`` and ``tenant_weight`` on the request
itself, so a worker needs no DB. ``lmaas.api.services.services_of`` puts this view under every
authenticated route, so a request reaches the engine stamped whatever route built it; whatever a
client sends in those fields never gets there (routes do not read them from bodies, and this
overwrites them anyway).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import msgspec

from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    SeqDelta,
)
from lmaas.engine.protocol import EngineClient, ServedModel
from lmaas.gateway.keys import Principal

_R = TypeVar("_R", bound=msgspec.Struct)


class TenantEngineClient:
    """An :class:`~lmaas.engine.protocol.EngineClient` that stamps each request with the
    principal's tenant and weight.

    Args:
        engine: The engine (or another view of it).
        principal: Whose requests these are.
    """

    def __init__(self, engine: EngineClient, principal: Principal) -> None:
        self._engine = engine
        self._tenant = principal.tenant
        self._weight = principal.tenant_weight

    def list_models(self) -> list[ServedModel]:
        return self._engine.list_models()

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        return self._engine.get_model(name, version)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        return self._engine.generate(model, self._stamp(request))

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        return await self._engine.embed(model, self._stamp(request))

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        return await self._engine.infer(model, self._stamp(request))

    def _stamp(self, request: _R) -> _R:
        return msgspec.structs.replace(request, tenant=self._tenant, tenant_weight=self._weight)
