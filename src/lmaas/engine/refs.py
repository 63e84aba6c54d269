"""The one place where a client's model reference becomes a served model.

Clients may name a model ``name``, ``name:version`` or ``name@alias`` on every route. The
:class:`ResolvingEngineClient` sits between the API and the engine: it parses the reference,
asks the registry which version an alias names (cached for ``alias_ttl_s``), checks that this
server serves that version, and hands the plain ``name`` on. A reference to a version or alias
that is not served is 404, exactly like an unknown model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable

from lmaas.core.errors import ModelNotFoundError
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

AliasLookup = Callable[[str, str], str | None]
"""``(name, alias) -> version`` or None; the registry's ``alias_target``."""

DEFAULT_ALIAS_TTL_S = 1.0
"""How long an alias lookup is reused: a moved alias is seen within this many seconds."""


class ResolvingEngineClient:
    """An :class:`~lmaas.engine.protocol.EngineClient` that accepts ``name:version`` and
    ``name@alias`` wherever a model name goes.

    Args:
        engine: The engine, which knows served models by plain name.
        aliases: Looks an alias up (None: only ``name`` and ``name:version`` are accepted).
        alias_ttl_s: How long a lookup is cached; the lookup is a short DB read, done at most
            once per alias per TTL so the event loop is barely held.
        clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        engine: EngineClient,
        aliases: AliasLookup | None = None,
        *,
        alias_ttl_s: float = DEFAULT_ALIAS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._aliases = aliases
        self._ttl_s = alias_ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}

    def resolve(self, ref: str, version: str | None = None) -> ServedModel:
        """The served model ``ref`` names (``version`` is the v2 path's ``/versions/{v}``).

        Raises:
            ModelNotFoundError: Malformed reference, unknown model, or a version or alias that
                names a version this server does not serve.
        """
        parsed = parse_model_ref(ref)
        if parsed is None:
            raise model_not_served(ref)
        wanted = parsed.version
        if parsed.alias is not None:
            wanted = self._alias_version(parsed.name, parsed.alias)
        if version is not None:
            if wanted is not None and wanted != version:
                raise model_not_served(f"{ref} version {version}")
            wanted = version
        served = self._engine.get_model(parsed.name)
        if wanted is None:
            return served
        if wanted != served.version:
            try:
                served = self._engine.get_model(parsed.name, wanted)
            except ModelNotFoundError:
                via = f" ({ref} is version {wanted})" if parsed.alias is not None else ""
                raise ModelNotFoundError(
                    f"model {parsed.name!r} version {wanted!r} is not served here{via}; this "
                    f"server serves {served.name}:{served.version}",
                    param="model",
                ) from None
        return dataclasses.replace(served, pinned=True)

    def _alias_version(self, name: str, alias: str) -> str:
        if self._aliases is None:
            raise model_not_served(f"{name}@{alias}")
        now = self._clock()
        cached = self._cache.get((name, alias))
        if cached is not None and cached[0] > now:
            version = cached[1]
        else:
            version = self._aliases(name, alias)
            self._cache[(name, alias)] = (now + self._ttl_s, version)
        if version is None:
            self._engine.get_model(name)  # an unknown model answers as such first
            raise ModelNotFoundError(f"model {name!r} has no alias {alias!r}", param="model")
        return version

    # ------------------------------------------------------------------ EngineClient

    def list_models(self) -> list[ServedModel]:
        return self._engine.list_models()

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        return self.resolve(name, version)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        return self._engine.generate(self.resolve(model).ref, request)

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        return await self._engine.embed(self.resolve(model).ref, request)

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        return await self._engine.infer(self.resolve(model).ref, request)
