"""The engine as one principal sees it: models outside its key's scope do not exist.

The API hands every route this view instead of the engine (``lmaas.api.services.services_of``),
so a route written tomorrow filters listings and refuses hidden models without a line of auth
code. A hidden model answers the very error an unknown one does (404, same message), so model
names cannot be enumerated with a scoped key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    SeqDelta,
)
from lmaas.core.types import parse_model_ref
from lmaas.engine.protocol import EngineClient, ServedModel, model_not_served
from lmaas.gateway.keys import Principal


class ScopedEngineClient:
    """An :class:`~lmaas.engine.protocol.EngineClient` limited to the models a principal may see.

    Args:
        engine: The whole engine.
        principal: Whose view this is.
    """

    def __init__(self, engine: EngineClient, principal: Principal) -> None:
        self._engine = engine
        self._principal = principal

    def _check(self, name: str) -> None:
        # A key's patterns name models; ``name:version`` and ``name@alias`` are checked by name.
        parsed = parse_model_ref(name)
        if not self._principal.may_see(name if parsed is None else parsed.name):
            raise model_not_served(name)

    def list_models(self) -> list[ServedModel]:
        return [m for m in self._engine.list_models() if self._principal.may_see(m.name)]

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        self._check(name)
        return self._engine.get_model(name, version)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        self._check(model)
        return self._engine.generate(model, request)

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        self._check(model)
        return await self._engine.embed(model, request)

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        self._check(model)
        return await self._engine.infer(model, request)
