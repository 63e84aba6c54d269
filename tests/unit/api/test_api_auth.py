"""Authentication and authorization of every route, in-process over the fake engine and a real
SQLite governance DB: deny by default, scopes, per-key model visibility, the admin API."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from api_helpers import chat_body
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lmaas.api.auth import PUBLIC_PATHS
from lmaas.api.context import principal_of
from lmaas.gateway.service import GovernanceService, IssuedKey
from lmaas.testing.fakes import FakeEngineClient

pytestmark = pytest.mark.anyio

BASE_URL = "http://lmaas.test"


@pytest.fixture
def secure_app(
    make_app: Callable[..., FastAPI], governance: GovernanceService, engine: FakeEngineClient
) -> FastAPI:
    return make_app(engine, auth=governance, governance=governance)


@pytest.fixture
async def anon(secure_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=secure_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
        yield c


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "fake-chat", path)


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """Every (path, methods) of an app, through FastAPI's included routers."""
    for route in routes:
        if hasattr(route, "original_router"):
            inner = prefix + route.include_context.prefix
            yield from _walk(route.original_router.routes, inner)
        elif isinstance(route, APIRoute | Route):
            yield prefix + route.path, set(route.methods or {"GET"})


async def test_every_route_but_the_probes_needs_a_key(
    secure_app: FastAPI, anon: httpx.AsyncClient
) -> None:
    """AU-1: walk the app's routes; a new route fails this test until it is decided on."""
    routes = list(_walk(secure_app.routes))
    documented = set(secure_app.openapi()["paths"])
    assert documented <= {path for path, _ in routes}  # the walk misses nothing
    checked = 0
    for path, methods in routes:
        for method in sorted(methods):
            response = await anon.request(method, _concrete(path))
            if path in PUBLIC_PATHS:
                assert response.status_code != 401, path
            else:
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                checked += 1
    assert checked > 20
    assert (await anon.get("/no/such/route")).status_code == 401
    assert (await anon.get("/health")).status_code == 200
    assert (await anon.get("/v2/health/live")).status_code == 200
    assert (await anon.get("/v2/health/ready")).status_code == 200


async def test_401_bodies_follow_the_route_family(anon: httpx.AsyncClient) -> None:
    response = await anon.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["message"]
    assert response.headers["x-request-id"]
    v2 = await anon.get("/v2/models/fake-chat")
    assert v2.status_code == 401 and isinstance(v2.json()["error"], str)


async def test_keys_are_read_from_bearer_or_x_api_key_and_checked_exactly(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    secret = admin.secret
    good = [_auth(secret), {"Authorization": f"bearer {secret}"}, {"x-api-key": secret}]
    for headers in good:
        assert (await anon.get("/v1/models", headers=headers)).status_code == 200
    bad = [
        _auth(secret.upper()),
        _auth(secret[:-1]),
        _auth(secret + "x"),
        _auth("sk-1234"),
        {"Authorization": f"Basic {secret}"},
        {"Authorization": "Bearer "},
        {"x-api-key": secret[:20]},
    ]
    for headers in bad:
        response = await anon.get("/v1/models", headers=headers)
        assert response.status_code == 401, headers
        assert secret not in response.text


async def test_metrics_needs_a_key_unless_configured_public(
    make_app: Callable[..., FastAPI], governance: GovernanceService, admin: IssuedKey
) -> None:
    for public, expected in ((False, 401), (True, 200)):
        app = make_app(auth=governance, governance=governance, public_metrics=public)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
            assert (await c.get("/metrics")).status_code == expected
            assert (await c.get("/metrics", headers=_auth(admin.secret))).status_code == 200


async def _key(anon: httpx.AsyncClient, admin: IssuedKey, **body: Any) -> str:
    tenant = body.pop("tenant", "team-a")
    await anon.post("/admin/tenants", json={"name": tenant}, headers=_auth(admin.secret))
    response = await anon.post(
        "/admin/keys", json={"tenant": tenant, **body}, headers=_auth(admin.secret)
    )
    assert response.status_code == 201, response.text
    secret = response.json()["secret"]
    assert isinstance(secret, str)
    return secret


async def test_a_scoped_key_sees_and_calls_only_its_models(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    """AU-3: models outside the key's globs are 404 exactly like models that do not exist."""
    key = _auth(await _key(anon, admin, scopes=["inference"], models=["fake-c*"]))
    listed = (await anon.get("/v1/models", headers=key)).json()["data"]
    assert {m["id"] for m in listed} == {"fake-chat", "fake-completion"}
    assert (await anon.get("/v1/models/fake-chat", headers=key)).status_code == 200
    ok = await anon.post("/v1/chat/completions", json=chat_body(), headers=key)
    assert ok.status_code == 200
    for model in ("fake-embed", "no-such-model"):
        hidden = await anon.post("/v1/embeddings", json={"model": model, "input": "x"}, headers=key)
        assert hidden.status_code == 404
        assert hidden.json()["error"]["message"] == f"model '{model}' is not served here"
        assert (await anon.get(f"/v1/models/{model}", headers=key)).status_code == 404
        v2 = await anon.get(f"/v2/models/{model}", headers=key)
        assert v2.status_code == 404 and v2.json() == {
            "error": f"model '{model}' is not served here"
        }
        infer = await anon.post(f"/v2/models/{model}/infer", json={"inputs": []}, headers=key)
        assert infer.status_code == 404
    everything = (await anon.get("/v1/models", headers=_auth(admin.secret))).json()["data"]
    assert {m["id"] for m in everything} == {"fake-chat", "fake-completion", "fake-embed"}


async def test_scopes_gate_inference_and_admin_routes(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    reader = _auth(await _key(anon, admin, scopes=["models:read"]))
    assert (await anon.get("/v1/models", headers=reader)).status_code == 200
    refused = await anon.post("/v1/chat/completions", json=chat_body(), headers=reader)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    inference = _auth(await _key(anon, admin, scopes=["inference"]))
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/tenants"), ("GET", "/admin")):
        response = await anon.request(method, path, headers=inference)
        assert response.status_code == 403, path
        assert "admin" in response.json()["error"]["message"]


async def test_the_principal_is_on_request_state_for_routes_added_later(
    secure_app: FastAPI, anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    async def whoami(request: Request) -> JSONResponse:
        principal = principal_of(request.scope)
        assert principal is request.state.principal
        return JSONResponse({"key": principal.key_id, "tenant": principal.tenant})

    secure_app.add_route("/v1/whoami", whoami)
    assert (await anon.get("/v1/whoami")).status_code == 401
    response = await anon.get("/v1/whoami", headers=_auth(admin.secret))
    assert response.json() == {"key": admin.key.id, "tenant": "admin"}


async def test_admin_api_manages_tenants_and_keys(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    auth = _auth(admin.secret)
    created = await anon.post("/admin/tenants", json={"name": "team-a"}, headers=auth)
    assert created.status_code == 201 and created.json()["name"] == "team-a"
    assert (
        await anon.post("/admin/tenants", json={"name": "team-a"}, headers=auth)
    ).status_code == 409
    assert (
        await anon.post("/admin/tenants", json={"name": "Bad Name"}, headers=auth)
    ).status_code == 400
    names = [t["name"] for t in (await anon.get("/admin/tenants", headers=auth)).json()["data"]]
    assert names == ["admin", "team-a"]
    assert (await anon.get("/admin/tenants/nope", headers=auth)).status_code == 404

    body = {"tenant": "team-a", "scopes": ["inference"], "models": ["fake-chat"], "name": "ci"}
    issued = (await anon.post("/admin/keys", json=body, headers=auth)).json()
    assert issued["secret"].startswith(issued["prefix"] + "-") and issued["status"] == "active"
    key_id = issued["id"]
    listed = (await anon.get("/admin/keys?tenant=team-a", headers=auth)).json()["data"]
    assert [k["id"] for k in listed] == [key_id] and "secret" not in listed[0]
    shown = (await anon.get(f"/admin/keys/{issued['prefix']}", headers=auth)).json()
    assert shown["models"] == ["fake-chat"] and "secret" not in shown
    bad = await anon.post("/admin/keys", json={**body, "scopes": ["root"]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scopes"
    assert (await anon.get("/admin/keys/000000000000", headers=auth)).status_code == 404

    rotated = (await anon.post(f"/admin/keys/{key_id}/rotate", headers=auth)).json()
    assert rotated["id"] == key_id and rotated["rotated_at"] is not None
    chat = chat_body()
    assert (
        await anon.post("/v1/chat/completions", json=chat, headers=_auth(issued["secret"]))
    ).status_code == 401
    new = _auth(rotated["secret"])
    assert (await anon.post("/v1/chat/completions", json=chat, headers=new)).status_code == 200
    revoked = await anon.post(f"/admin/keys/{key_id}/revoke", headers=auth)
    assert revoked.json()["status"] == "revoked"
    refused = await anon.post("/v1/chat/completions", json=chat, headers=new)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]

    last = await anon.delete(f"/admin/keys/{admin.key.id}", headers=auth)
    assert last.status_code == 409
    deleted = await anon.delete("/admin/tenants/team-a", headers=auth)
    assert deleted.json() == {"object": "tenant.deleted", "name": "team-a", "deleted": True}


async def test_openapi_documents_the_admin_routes_and_the_key_schemes(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    schema = (await anon.get("/openapi.json", headers=_auth(admin.secret))).json()
    assert {
        "/admin/tenants",
        "/admin/tenants/{name}",
        "/admin/keys",
        "/admin/keys/{key_id}",
        "/admin/keys/{key_id}/rotate",
        "/admin/keys/{key_id}/revoke",
    } <= set(schema["paths"])
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/models"]["get"]


async def test_admin_routes_without_governance_are_501(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/keys")
    assert response.status_code == 501


async def test_rate_limits_answer_429_with_retry_after_in_both_envelopes(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    key = _auth(await _key(anon, admin, scopes=["inference"], limits={"rpm": 2}))
    for _ in range(2):
        ok = await anon.post("/v1/chat/completions", json=chat_body(), headers=key)
        assert ok.status_code == 200
    refused = await anon.post("/v1/chat/completions", json=chat_body(), headers=key)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) == 30
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "2 requests per minute" in error["message"]
    v2 = await anon.post(
        "/v2/models/fake-embed/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
        headers=key,
    )
    assert v2.status_code == 429 and "requests per minute" in v2.json()["error"]
    assert (await anon.get("/v1/models", headers=key)).status_code == 200  # no model call


async def test_tenant_limits_are_shared_and_limits_change_through_the_api(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    auth = _auth(admin.secret)
    created = await anon.post(
        "/admin/tenants", json={"name": "team-t", "limits": {"tpm": 100}}, headers=auth
    )
    assert created.json()["limits"] == {
        "rpm": None,
        "tpm": 100,
        "max_concurrent": None,
        "quotas": [],
    }
    one = _auth(await _key(anon, admin, tenant="team-t", scopes=["inference"]))
    two = _auth(await _key(anon, admin, tenant="team-t", scopes=["inference"]))
    body = chat_body(max_tokens=50)  # reserves ~58 of the tenant's 100 tokens per minute
    assert (await anon.post("/v1/chat/completions", json=body, headers=one)).status_code == 200
    # the first request settled to its real (small) count, so 58 more fit for the other key
    assert (await anon.post("/v1/chat/completions", json=body, headers=two)).status_code == 200
    long_prompt = chat_body("word " * 100, max_tokens=1)
    too_big = await anon.post("/v1/chat/completions", json=long_prompt, headers=one)
    assert too_big.status_code == 429 and too_big.json()["error"]["param"] == "max_tokens"
    changed = await anon.put("/admin/tenants/team-t/limits", json={"rpm": 1}, headers=auth)
    assert changed.json()["limits"] == {
        "rpm": 1,
        "tpm": None,
        "max_concurrent": None,
        "quotas": [],
    }
    assert (await anon.post("/v1/chat/completions", json=body, headers=one)).status_code == 200
    assert (await anon.post("/v1/chat/completions", json=body, headers=two)).status_code == 429
    bad = await anon.put("/admin/tenants/team-t/limits", json={"rpm": 0}, headers=auth)
    assert bad.status_code == 400


async def test_concurrency_limit_holds_while_a_stream_is_open(
    anon: httpx.AsyncClient, admin: IssuedKey, engine: FakeEngineClient
) -> None:
    key_body = {"scopes": ["inference"], "limits": {"max_concurrent": 1}}
    key = _auth(await _key(anon, admin, **key_body))
    engine.token_delay_s = 0.05
    stream_body = chat_body("a b c d e f", stream=True, max_tokens=6)
    streaming = asyncio.create_task(
        anon.post("/v1/chat/completions", json=stream_body, headers=key)
    )
    await asyncio.sleep(0.1)  # the stream is open, a token every 50 ms
    busy = await anon.post("/v1/chat/completions", json=chat_body(), headers=key)
    assert busy.status_code == 429 and "in flight" in busy.json()["error"]["message"]
    assert (await streaming).status_code == 200
    assert (
        await anon.post("/v1/chat/completions", json=chat_body(), headers=key)
    ).status_code == 200


async def test_admin_api_sets_a_tenants_fair_share_weight(
    anon: httpx.AsyncClient, admin: IssuedKey
) -> None:
    auth = _auth(admin.secret)
    body = {"name": "gold", "weight": 3}
    created = await anon.post("/admin/tenants", json=body, headers=auth)
    assert created.status_code == 201 and created.json()["weight"] == 3.0
    changed = await anon.put("/admin/tenants/gold/weight", json={"weight": 0.5}, headers=auth)
    assert changed.status_code == 200 and changed.json()["weight"] == 0.5
    bad = await anon.put("/admin/tenants/gold/weight", json={"weight": 0}, headers=auth)
    assert bad.status_code == 400
    assert (await anon.get("/admin/tenants/gold", headers=auth)).json()["weight"] == 0.5
