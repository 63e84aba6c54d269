"""``name``, ``name:version`` and ``name@alias`` on every route, resolved in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from lmaas.api import ApiServices, DefaultApiConfig, create_app
from lmaas.core.errors import ModelNotFoundError
from lmaas.core.messages import EmbedRequest, GenerateRequest, SamplingParams
from lmaas.core.types import Task
from lmaas.engine.refs import ResolvingEngineClient
from lmaas.gateway.keys import Principal, Scope
from lmaas.gateway.visibility import ScopedEngineClient
from lmaas.observability.metrics import Metrics
from lmaas.testing.fakes import FakeEngineClient, FakeModelSpec

BASE_URL = "http://lmaas.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _engine() -> FakeEngineClient:
    return FakeEngineClient(
        [
            FakeModelSpec("chat", Task.CHAT, version="3"),
            FakeModelSpec("emb", Task.EMBEDDING, version="1", context_length=512),
        ]
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    aliases = {("chat", "production"): "3", ("chat", "staging"): "4", ("emb", "prod"): "1"}
    resolving = ResolvingEngineClient(_engine(), lambda n, a: aliases.get((n, a)))
    services = ApiServices(engine=resolving, config=DefaultApiConfig(), metrics=Metrics())
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}]}


@pytest.mark.anyio
@pytest.mark.parametrize("model", ["chat", "chat:3", "chat@production"])
async def test_chat_accepts_every_reference_form(client: httpx.AsyncClient, model: str) -> None:
    response = await client.post("/v1/chat/completions", json=_chat(model))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "chat"
    assert body["choices"][0]["message"]["content"] == "hi there"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("chat:4", "version '4' is not served here; this server serves chat:3"),
        ("chat@staging", "(chat@staging is version 4)"),
        ("chat@canary", "has no alias 'canary'"),
        ("nope@production", "'nope'"),
        ("chat:3@production", "chat:3@production"),
        ("Chat", "Chat"),
    ],
)
async def test_unknown_versions_and_aliases_are_404(
    client: httpx.AsyncClient, model: str, needle: str
) -> None:
    response = await client.post("/v1/chat/completions", json=_chat(model))
    assert response.status_code == 404, response.text
    assert needle in response.json()["error"]["message"]
    ok = await client.post("/v1/chat/completions", json=_chat("chat"))
    assert ok.status_code == 200


@pytest.mark.anyio
async def test_embeddings_models_and_v2_accept_references(client: httpx.AsyncClient) -> None:
    for model in ("emb:1", "emb@prod"):
        response = await client.post("/v1/embeddings", json={"model": model, "input": "a b"})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "emb"
    assert (await client.get("/v1/models/chat@production")).json()["id"] == "chat"
    assert (await client.get("/v1/models/chat:2")).status_code == 404
    assert (await client.get("/v2/models/chat:3")).status_code == 200
    assert (await client.get("/v2/models/chat@production/versions/3")).status_code == 200
    assert (await client.get("/v2/models/chat@staging")).status_code == 404
    assert (await client.get("/v2/models/chat/versions/4")).status_code == 404
    assert (await client.get("/v2/models/chat:3/versions/4")).status_code == 404


@pytest.mark.anyio
async def test_alias_lookups_are_cached_for_the_ttl() -> None:
    table = {("chat", "production"): "3"}
    calls: list[tuple[str, str]] = []

    def lookup(name: str, alias: str) -> str | None:
        calls.append((name, alias))
        return table.get((name, alias))

    clock = _Clock()
    engine = ResolvingEngineClient(_engine(), lookup, alias_ttl_s=1.0, clock=clock)
    assert engine.get_model("chat@production").version == "3"
    table[("chat", "production")] = "4"  # moved in the registry
    assert engine.get_model("chat@production").version == "3"  # cached
    assert len(calls) == 1
    clock.now = 1.5
    with pytest.raises(ModelNotFoundError, match="is version 4"):
        engine.get_model("chat@production")
    request = GenerateRequest("r1", SamplingParams(max_tokens=2), prompt="a b c")
    deltas = [d async for d in engine.generate("chat:3", request)]
    assert "".join(d.text for d in deltas).split() == ["a", "b"]
    result = await engine.embed("emb:1", EmbedRequest("r2", texts=["x"]))
    assert result.num_inputs == 1
    with pytest.raises(ModelNotFoundError):
        await engine.embed("emb:2", EmbedRequest("r3", texts=["x"]))


def test_without_alias_lookup_aliases_are_404() -> None:
    engine = ResolvingEngineClient(_engine())
    assert engine.get_model("chat:3").name == "chat"
    with pytest.raises(ModelNotFoundError):
        engine.get_model("chat@production")


def test_key_model_patterns_see_references_by_name() -> None:
    principal = Principal("k", "t", frozenset({Scope.INFERENCE}), models=("chat",))
    scoped = ScopedEngineClient(ResolvingEngineClient(_engine()), principal)
    assert scoped.get_model("chat:3").name == "chat"
    with pytest.raises(ModelNotFoundError):
        scoped.get_model("emb:1")
