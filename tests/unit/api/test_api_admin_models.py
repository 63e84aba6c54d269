"""``/admin/models/{name}/aliases|history``, in-process over a real SQLite registry and
governance DB: moves are audited with the calling key, errors follow the one error table."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from safetensors.numpy import save_file

from lmaas.gateway.keys import key_prefix
from lmaas.gateway.service import GovernanceService, IssuedKey
from lmaas.registry.service import RegistryService

pytestmark = pytest.mark.anyio

BASE_URL = "http://lmaas.test"


@pytest.fixture
def registry(tmp_path: Path, governance: GovernanceService) -> Iterator[RegistryService]:
    src = tmp_path / "src"
    src.mkdir()
    config = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(src / "model.safetensors"))
    service = RegistryService(
        tmp_path / "home",
        f"sqlite:///{tmp_path / 'lmaas.db'}",
        offline=True,
        alias_audit=governance.audit_alias_move,
    )
    for _ in range(3):
        service.import_model(str(src), name="m")
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
async def client(
    make_app: Callable[..., FastAPI], governance: GovernanceService, registry: RegistryService
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(auth=governance, governance=governance, registry=registry)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
        yield c


def _auth(issued: IssuedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {issued.secret}"}


async def test_aliases_move_over_http_and_are_audited(
    client: httpx.AsyncClient, admin: IssuedKey, governance: GovernanceService
) -> None:
    auth = _auth(admin)
    url = "/admin/models/m/aliases/production"
    first = await client.put(url, json={"version": "1"}, headers=auth)
    assert first.status_code == 200, first.text
    moved = (await client.put(url, json={"version": "2"}, headers=auth)).json()
    actor = key_prefix(admin.key.id)
    assert (moved["version"], moved["previous_version"], moved["actor"]) == ("2", "1", actor)
    await client.put("/admin/models/m/aliases/staging", json={"version": "3"}, headers=auth)

    listed = (await client.get("/admin/models/m/aliases", headers=auth)).json()
    assert listed["latest"] == "3"
    assert [(a["alias"], a["version"]) for a in listed["data"]] == [
        ("production", "2"),
        ("staging", "3"),
    ]
    one = (await client.get(url, headers=auth)).json()
    assert (one["alias"], one["version"]) == ("production", "2")

    removed = await client.delete("/admin/models/m/aliases/staging", headers=auth)
    assert removed.status_code == 200
    assert (removed.json()["version"], removed.json()["previous_version"]) == (None, "3")

    history = (await client.get("/admin/models/m/history", headers=auth)).json()
    assert [(h["alias"], h["previous_version"], h["version"]) for h in history["aliases"]] == [
        ("production", None, "1"),
        ("production", "1", "2"),
        ("staging", None, "3"),
        ("staging", "3", None),
    ]
    assert [v["version"] for v in history["versions"]] == ["1", "2", "3"]

    rows = governance.list_audit(after_seq=0, target="m@production")
    assert [(r.actor, r.action, (r.after or {}).get("version")) for r in rows] == [
        (actor, "alias.move", "1"),
        (actor, "alias.move", "2"),
    ]
    (gone,) = governance.list_audit(after_seq=0, action="alias.remove")
    assert (gone.target, gone.before, gone.after) == (
        "m@staging",
        {"model": "m", "alias": "staging", "version": "3"},
        None,
    )
    assert governance.verify_audit().ok


async def test_alias_route_errors_follow_the_error_table(
    client: httpx.AsyncClient, admin: IssuedKey, governance: GovernanceService
) -> None:
    auth = _auth(admin)
    cases = [
        ("PUT", "/admin/models/m/aliases/production", {"version": "9"}, 404),
        ("PUT", "/admin/models/nope/aliases/production", {"version": "1"}, 404),
        ("PUT", "/admin/models/m/aliases/latest", {"version": "1"}, 400),
        ("PUT", "/admin/models/m/aliases/Prod", {"version": "1"}, 400),
        ("PUT", "/admin/models/m/aliases/production", {"version": "1", "x": 1}, 400),
        ("PUT", "/admin/models/m/aliases/production", {}, 400),
        ("DELETE", "/admin/models/m/aliases/production", None, 404),
        ("GET", "/admin/models/m/aliases/production", None, 404),
        ("GET", "/admin/models/nope/aliases", None, 404),
        ("GET", "/admin/models/nope/history", None, 404),
    ]
    for method, path, body, status in cases:
        response = await client.request(method, path, json=body, headers=auth)
        assert response.status_code == status, (method, path, body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], error
    # Nothing moved, nothing audited.
    assert governance.list_audit(after_seq=0, action="alias.move") == []


async def test_alias_routes_need_the_admin_scope(
    client: httpx.AsyncClient, admin: IssuedKey, governance: GovernanceService
) -> None:
    reader = governance.create_key("admin", scopes=["models:read", "inference"])
    headers = {"Authorization": f"Bearer {reader.secret}"}
    put = await client.put(
        "/admin/models/m/aliases/production", json={"version": "1"}, headers=headers
    )
    assert put.status_code == 403
    assert (await client.get("/admin/models/m/history", headers=headers)).status_code == 403
    assert (await client.get("/admin/models/m/aliases")).status_code == 401


async def test_routes_are_documented_and_501_without_a_registry(
    make_app: Callable[..., FastAPI],
) -> None:
    app = make_app()
    paths = app.openapi()["paths"]
    assert set(paths["/admin/models/{name}/aliases/{alias}"]) == {"get", "put", "delete"}
    assert "/admin/models/{name}/history" in paths
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
        response = await c.get("/admin/models/m/aliases")
    assert response.status_code == 501
