"""Quotas per day or month on a real server (real worker, real SQLite DB): past a quota a key
gets 429 ``quota_exceeded`` with ``Retry-After`` until the period resets; tokens are reserved
then settled; what was used survives a restart (the usage table is the durable truth)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmaas.gateway.usage_store import SqlUsageStore, UsageQuery
from lmaas.registry.service import RegistryService
from tests.integration.server.conftest import ECHO
from tests.integration.serverproc import ServerProcess, start_server

ENV = {"LMAAS_AUTH__KEY_CACHE_TTL_S": "0"}


def _import_echo(home: Path, source: Path) -> None:
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    try:
        registry.import_model(str(source), name="echo", serving={"options": {"runner": ECHO}})
    finally:
        registry.close()


@pytest.fixture(scope="module")
def home_and_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]
) -> Iterator[tuple[Path, ServerProcess, dict[str, str]]]:
    home = tmp_path_factory.mktemp("quota-home")
    _import_echo(home, tiny_dirs["chat"])
    proc = start_server(home, ["echo"], auth=True, env=ENV)
    try:
        proc.wait_ready(120)
        assert proc.admin_key is not None
        yield home, proc, {"Authorization": f"Bearer {proc.admin_key}"}
    finally:
        proc.stop()


def _key(server: ServerProcess, admin: dict[str, str], tenant: str, **limits: Any) -> Any:
    url = server.base_url
    created = httpx.post(f"{url}/admin/tenants", json={"name": tenant}, headers=admin)
    assert created.status_code in (201, 409), created.text
    body = {"tenant": tenant, "scopes": ["inference"], "limits": limits}
    key = httpx.post(f"{url}/admin/keys", json=body, headers=admin)
    assert key.status_code == 201, key.text
    return key.json()


def _complete(
    server: ServerProcess, secret: str, max_tokens: int = 4, stop: str | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"model": "echo", "prompt": "a b", "max_tokens": max_tokens}
    if stop is not None:
        body["stop"] = [stop]
    headers = {"Authorization": f"Bearer {secret}"}
    return httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=60)


def _seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    return (
        now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now
    ).total_seconds()


def _assert_quota_refusal(response: httpx.Response, until_s: float) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "quota_exceeded"
    assert abs(int(response.headers["retry-after"]) - until_s) <= 10
    return error


def test_a_requests_quota_answers_429_until_the_day_ends(
    home_and_server: tuple[Path, ServerProcess, dict[str, str]],
) -> None:
    home, server, admin = home_and_server
    quota = {"metric": "requests", "limit": 3, "period": "day"}
    key = _key(server, admin, "daily", quotas=[quota])
    assert key["limits"]["quotas"] == [{"metric": "requests", "limit": 3.0, "period": "day"}]
    for _ in range(3):
        assert _complete(server, key["secret"]).status_code == 200
    error = _assert_quota_refusal(_complete(server, key["secret"]), _seconds_to_midnight())
    assert "3 requests/day" in error["message"]
    listed = httpx.get(f"{server.base_url}/admin/keys/{key['id']}", headers=admin).json()
    assert listed["limits"]["quotas"] == [{"metric": "requests", "limit": 3.0, "period": "day"}]
    # the admin raises the quota: the key passes again (what was used still counts)
    raised = {"quotas": [{**quota, "limit": 4}]}
    put = httpx.put(f"{server.base_url}/admin/keys/{key['id']}/limits", json=raised, headers=admin)
    assert put.status_code == 200, put.text
    assert _complete(server, key["secret"]).status_code == 200
    assert _complete(server, key["secret"]).status_code == 429
    # usage rows: the 4 served, none for the refused
    store = SqlUsageStore(f"sqlite:///{home / 'lmaas.db'}")
    try:
        httpx.get(f"{server.base_url}/admin/usage", headers=admin)  # writes the buffer
        assert len(store.list_records(UsageQuery(key_id=key["id"]))) == 4
    finally:
        store.close()


def test_tokens_are_reserved_at_admission_and_settled_at_the_end(
    home_and_server: tuple[Path, ServerProcess, dict[str, str]],
) -> None:
    _, server, admin = home_and_server
    # each request reserves 1 (the prompt estimate) + 100 (max_tokens) of 150, and uses 4:
    # the echo model says "a", then stops at "b"
    key = _key(
        server, admin, "tokens", quotas=[{"metric": "tokens", "limit": 150, "period": "month"}]
    )
    used = 0
    admitted = 0
    while True:
        response = _complete(server, key["secret"], max_tokens=100, stop="b")
        if response.status_code != 200:
            break
        admitted += 1
        used += response.json()["usage"]["total_tokens"]
        assert admitted < 100
    now = datetime.now(UTC)
    month_end = (now.replace(day=1) + timedelta(days=32)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    error = _assert_quota_refusal(response, (month_end - now).total_seconds())
    assert "150 tokens/month" in error["message"] and f"used {used} of" in error["message"]
    # settled: without it the second request (2 x 101 > 150) would have been refused
    assert admitted >= 2 and used + 101 > 150 and used <= 150
    # a request that may use more than the whole quota is told to lower max_tokens
    too_big = _complete(
        server,
        _key(server, admin, "tokens2", quotas=[{"metric": "tokens", "limit": 50, "period": "day"}])[
            "secret"
        ],
        max_tokens=80,
    )
    assert too_big.status_code == 429 and too_big.json()["error"]["param"] == "max_tokens"


def test_what_was_used_survives_a_restart(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    home = tmp_path / "restart-home"
    _import_echo(home, tiny_dirs["chat"])
    first = start_server(home, ["echo"], auth=True, env=ENV)
    try:
        first.wait_ready(120)
        assert first.admin_key is not None
        admin = {"Authorization": f"Bearer {first.admin_key}"}
        quota = [{"metric": "requests", "limit": 5, "period": "month"}]
        created = httpx.post(
            f"{first.base_url}/admin/tenants",
            json={"name": "team", "limits": {"quotas": quota}},
            headers=admin,
        )
        assert created.status_code == 201, created.text
        key = _key(
            first, admin, "team", quotas=[{"metric": "requests", "limit": 3, "period": "day"}]
        )
        other = _key(first, admin, "team")
        assert [_complete(first, key["secret"]).status_code for _ in range(2)] == [200, 200]
        assert _complete(first, other["secret"]).status_code == 200
    finally:
        first.stop()  # SIGTERM: the usage buffer is written before the exit
    second = start_server(home, ["echo"], auth=True, env=ENV)
    try:
        second.wait_ready(120)
        assert _complete(second, key["secret"]).status_code == 200  # the key's 3rd today
        _assert_quota_refusal(_complete(second, key["secret"]), _seconds_to_midnight())
        assert _complete(second, other["secret"]).status_code == 200  # the tenant's 5th
        refused = _complete(second, other["secret"])  # the tenant's quota is used up
        assert refused.status_code == 429 and "tenant team" in refused.json()["error"]["message"]
    finally:
        second.stop()
