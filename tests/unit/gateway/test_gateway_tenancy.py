"""Tenant weights: stored (SQLite and PostgreSQL), carried by the principal, stamped on every
request that reaches the engine."""

from __future__ import annotations

from typing import Any

import pytest

from lmaas.core.errors import InvalidRequestError, NotFoundError
from lmaas.core.messages import (
    EmbedRequest,
    GenerateRequest,
    InferRequest,
    RerankRequest,
    SamplingParams,
)
from lmaas.gateway.keys import Principal, Scope
from lmaas.gateway.limited import estimate_prompt_tokens
from lmaas.gateway.service import GovernanceService
from lmaas.gateway.tenancy import TenantEngineClient

pytestmark = pytest.mark.anyio


async def test_a_tenants_weight_is_stored_and_reaches_its_principal(
    governance: GovernanceService,
) -> None:
    assert governance.create_tenant("plain").weight == 1.0
    assert governance.create_tenant("gold", weight=3.0).weight == 3.0
    issued = governance.create_key("gold", ["inference"])
    assert (await governance.authenticate(issued.secret)).tenant_weight == 3.0
    assert governance.set_tenant_weight("gold", 0.5).weight == 0.5
    assert governance.get_tenant("gold").weight == 0.5
    assert (await governance.authenticate(issued.secret)).tenant_weight == 0.5
    for bad in (0.0, -1.0, 1001.0, float("nan")):
        with pytest.raises(InvalidRequestError, match="weight"):
            governance.set_tenant_weight("gold", bad)
    with pytest.raises(NotFoundError):
        governance.set_tenant_weight("nobody", 2.0)


class _Recorder:
    """An engine that keeps the requests it gets."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def list_models(self) -> list[Any]:
        return []

    def get_model(self, name: str, version: str | None = None) -> Any:
        raise NotImplementedError

    def is_ready(self) -> bool:
        return True

    async def _nothing(self) -> Any:
        if False:
            yield

    def generate(self, model: str, request: GenerateRequest) -> Any:
        self.seen.append(request)
        return self._nothing()

    async def embed(self, model: str, request: EmbedRequest) -> Any:
        self.seen.append(request)

    async def infer(self, model: str, request: InferRequest) -> Any:
        self.seen.append(request)


async def test_every_request_is_stamped_with_the_callers_tenant() -> None:
    recorder = _Recorder()
    principal = Principal("k", "search", frozenset({Scope.INFERENCE}), tenant_weight=2.5)
    engine = TenantEngineClient(recorder, principal)  # type: ignore[arg-type]
    forged = GenerateRequest("g", SamplingParams(), prompt="hi", tenant="admin", tenant_weight=99)
    stream = engine.generate("m", forged)
    assert [d async for d in stream] == []  # type: ignore[attr-defined]
    await engine.embed("m", EmbedRequest("e", texts=["a"]))
    await engine.infer("m", RerankRequest("r", "q", ["d"]))
    assert [(r.tenant, r.tenant_weight) for r in recorder.seen] == [("search", 2.5)] * 3
    assert [r.request_id for r in recorder.seen] == ["g", "e", "r"]


def test_the_tenant_is_not_counted_as_prompt_text() -> None:
    plain = EmbedRequest("e", texts=["abcdefgh"])
    stamped = EmbedRequest("e", texts=["abcdefgh"], tenant="a-long-tenant-name")
    assert estimate_prompt_tokens(plain) == estimate_prompt_tokens(stamped) == 3
