"""Authentication and authorization of every route, in-process over the fake engine and a real
SQLite governance DB: deny by default, scopes, per-key model visibility, the admin API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
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

pytestmark = pytest.mark.anyio

BASE_URL = "http://lmaas.test"


@pytest.fixture
def governance(tmp_path: Path) -> Iterator[GovernanceService]:
    service = GovernanceService.open(f"sqlite:///{tmp_path / 'lmaas.db'}", key_cache_ttl_s=5.0)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def admin(governance: GovernanceService) -> IssuedKey:
    issued = governance.bootstrap_admin_key()
    assert issued is not None
    return issued


@pytest.fixture
def secure_app(make_app: Callable[..., FastAPI], governance: GovernanceService) -> FastAPI:
    return make_app(auth=governance, governance=governance)


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
