"""Usage metering in-process over the fake engine and a real SQLite DB: one record per request
that reached the engine, with the tokens the client was told, streams included; none for the
requests refused before it; ``/admin/usage`` as JSON and CSV; the audit trail of admin routes."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from api_helpers import chat_body, sse_payloads
from fastapi import FastAPI

from lmaas.gateway.limits import Limits
from lmaas.gateway.service import GovernanceService, IssuedKey
from lmaas.gateway.usage import UsageMeter
from lmaas.gateway.usage_store import SqlUsageStore
from lmaas.testing.fakes import FakeEngineClient

pytestmark = pytest.mark.anyio

BASE_URL = "http://lmaas.test"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lmaas.db'}"


@pytest.fixture
def governance(db_url: str) -> Iterator[GovernanceService]:
    service = GovernanceService.open(db_url, key_cache_ttl_s=5.0)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
async def meter(db_url: str) -> AsyncIterator[UsageMeter]:
    meter = UsageMeter(SqlUsageStore(db_url), flush_interval_s=60.0, batch_size=1000)
    await meter.start()
    try:
        yield meter
    finally:
        await meter.aclose()
        meter.close()


@pytest.fixture
async def client(
    make_app: Callable[..., FastAPI],
    governance: GovernanceService,
    engine: FakeEngineClient,
    meter: UsageMeter,
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(engine, auth=governance, governance=governance, meter=meter)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
        yield c


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _tenant_key(governance: GovernanceService, tenant: str, **kwargs: object) -> IssuedKey:
    governance.create_tenant(tenant)
    return governance.create_key(tenant, ["inference"], **kwargs)  # type: ignore[arg-type]


async def test_every_served_request_is_one_record_with_the_tokens_the_client_saw(
    client: httpx.AsyncClient, governance: GovernanceService, meter: UsageMeter
) -> None:
    team = _tenant_key(governance, "team")
    headers = _auth(team.secret)
    told: list[dict[str, int]] = []
    for i in range(3):
        body = chat_body(" ".join(["word"] * (i + 2)), max_tokens=16)
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
        told.append(response.json()["usage"])
    stream = chat_body("one two three four", stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=stream, headers=headers)
    assert response.status_code == 200
    told.append([p for p in sse_payloads(response.text) if isinstance(p, dict)][-1]["usage"])
    response = await client.post(
        "/v1/embeddings", json={"model": "fake-embed", "input": ["a b c", "d e"]}, headers=headers
    )
    assert response.status_code == 200
    embedded = response.json()["usage"]["prompt_tokens"]

    await meter.flush()
    rows = meter.store.list_records()
    assert len(rows) == 5
    chats = [r for r in rows if r.model == "fake-chat"]
    assert [(r.prompt_tokens, r.completion_tokens) for r in chats] == [
        (u["prompt_tokens"], u["completion_tokens"]) for u in told
    ]
    assert all(r.tenant == "team" and r.key_id == team.key.id for r in rows)
    assert all(r.status == 200 and not r.cancelled and r.latency_ms > 0 for r in rows)
    assert {r.task for r in chats} == {"chat"} and chats[0].route == "/v1/chat/completions"
    (embed_row,) = [r for r in rows if r.model == "fake-embed"]
    assert embed_row.embedding_tokens == embedded > 0 and embed_row.prompt_tokens == 0
    assert len({r.request_id for r in rows}) == 5


async def test_requests_refused_before_the_engine_are_not_metered(
    client: httpx.AsyncClient, governance: GovernanceService, meter: UsageMeter
) -> None:
    limited = _tenant_key(governance, "small", limits=Limits(rpm=1))
    scoped = governance.create_key("small", ["inference"], ["other-*"])
    reader = governance.create_key("small", ["models:read"])
    body = chat_body("hello", max_tokens=4)
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 401
    refused = [
        (reader.secret, body, 403),
        (scoped.secret, body, 404),  # a model outside the key's scope
        (limited.secret, {**body, "model": "no-such-model"}, 404),
        (limited.secret, {**body, "temperature": -3}, 400),  # validated by the route
        (limited.secret, body, 200),
        (limited.secret, body, 429),  # past rpm=1
    ]
    for secret, payload, status in refused:
        response = await client.post("/v1/chat/completions", json=payload, headers=_auth(secret))
        assert response.status_code == status, response.text
    await meter.flush()
    rows = meter.store.list_records()
    assert [(r.key_id, r.status) for r in rows] == [(limited.key.id, 200)]


async def test_admin_usage_aggregates_as_json_and_csv(
    client: httpx.AsyncClient, governance: GovernanceService, admin: IssuedKey
) -> None:
    a = _tenant_key(governance, "alpha")
    b = _tenant_key(governance, "beta")
    for secret, n in ((a.secret, 3), (b.secret, 2)):
        for _ in range(n):
            body = chat_body("x y", max_tokens=2)
            response = await client.post("/v1/chat/completions", json=body, headers=_auth(secret))
            assert response.status_code == 200
    response = await client.get(
        "/admin/usage", params={"group_by": "tenant,model"}, headers=_auth(admin.secret)
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [(d["tenant"], d["model"], d["requests"]) for d in data] == [
        ("alpha", "fake-chat", 3),
        ("beta", "fake-chat", 2),
    ]
    assert data[0]["prompt_tokens"] == 6 and data[0]["completion_tokens"] == 6
    assert data[0]["total_tokens"] == 12
    by_key = await client.get(
        "/admin/usage",
        params={"group_by": ["key", "day"], "format": "csv", "tenant": "beta"},
        headers=_auth(admin.secret),
    )
    assert by_key.status_code == 200 and by_key.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(by_key.text)))
    assert [(r["key"], r["requests"]) for r in rows] == [(b.key.id, "2")]
    future = await client.get(
        "/admin/usage", params={"since": "2999-01-01"}, headers=_auth(admin.secret)
    )
    assert future.json()["data"] == []
    bad = await client.get("/admin/usage?group_by=color", headers=_auth(admin.secret))
    assert bad.status_code == 400 and "group" in bad.text
    forbidden = await client.get("/admin/usage", headers=_auth(a.secret))
    assert forbidden.status_code == 403


async def test_admin_routes_write_the_audit_trail_with_the_actor(
    client: httpx.AsyncClient, admin: IssuedKey, db_url: str
) -> None:
    headers = _auth(admin.secret)
    assert (
        await client.post("/admin/tenants", json={"name": "ops"}, headers=headers)
    ).status_code == 201
    created = await client.post(
        "/admin/keys", json={"tenant": "ops", "scopes": ["inference"]}, headers=headers
    )
    key_id = created.json()["id"]
    await client.put(f"/admin/keys/{key_id}/limits", json={"rpm": 5}, headers=headers)
    await client.post(f"/admin/keys/{key_id}/revoke", headers=headers)
    # a refused change (409) is not an action: nothing is audited for it
    assert (
        await client.post("/admin/tenants", json={"name": "ops"}, headers=headers)
    ).status_code == 409
    trail = (await client.get("/admin/audit", headers=headers)).json()["data"]
    actions = [(r["action"], r["target"], r["actor"]) for r in reversed(trail)]
    actor = f"lmaas-{admin.key.id}"
    assert actions == [
        ("key.create", admin.key.id, "system:bootstrap"),
        ("tenant.create", "ops", actor),
        ("key.create", key_id, actor),
        ("key.limits", key_id, actor),
        ("key.revoke", key_id, actor),
    ]
    limits = trail[1]
    assert limits["before"]["limits"]["rpm"] is None and limits["after"]["limits"]["rpm"] == 5
    secret = created.json()["secret"]
    assert secret not in str(trail) and "sha256" not in str(trail)
    verified = (await client.get("/admin/audit/verify", headers=headers)).json()
    assert verified == {"ok": True, "rows": 5, "first_broken_seq": None, "reason": ""}
