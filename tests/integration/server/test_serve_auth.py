"""Governance on a real server: secure by default, the first-start admin key, scoped keys made
through the admin API and the CLI, revoked and expired keys, and no plaintext key on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI, RateLimitError

from lmaas.registry.service import RegistryService
from tests.integration.server.conftest import ECHO
from tests.integration.serverproc import ServerProcess, start_server

SECRETS: list[str] = []
"""Every key this module saw in clear text; none may be on disk."""


def _import_echo_models(home: Path, source: Path, names: list[str]) -> None:
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    try:
        for name in names:
            registry.import_model(str(source), name=name, serving={"options": {"runner": ECHO}})
    finally:
        registry.close()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMAAS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmaas.cli", *args, "--home", str(home)]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]
) -> Iterator[ServerProcess]:
    """A server started secure by default, serving 'echo' and 'secret-echo'; keys changed by
    another process apply at once (no key cache)."""
    home = tmp_path_factory.mktemp("secure-home")
    _import_echo_models(home, tiny_dirs["chat"], ["echo", "secret-echo"])
    proc = start_server(
        home, ["echo", "secret-echo"], auth=True, env={"LMAAS_AUTH__KEY_CACHE_TTL_S": "0"}
    )
    try:
        proc.wait_ready(120)
        yield proc
    finally:
        proc.stop()


def _admin(server: ServerProcess) -> dict[str, str]:
    assert server.admin_key is not None
    SECRETS.append(server.admin_key)
    return {"Authorization": f"Bearer {server.admin_key}"}


def _new_key(server: ServerProcess, tenant: str, **body: object) -> str:
    admin = _admin(server)
    httpx.post(f"{server.base_url}/admin/tenants", json={"name": tenant}, headers=admin)
    response = httpx.post(
        f"{server.base_url}/admin/keys", json={"tenant": tenant, **body}, headers=admin
    )
    assert response.status_code == 201, response.text
    secret: str = response.json()["secret"]
    SECRETS.append(secret)
    return secret


def test_secure_by_default_the_admin_key_is_printed_once(secure: ServerProcess) -> None:
    log = secure.log()
    assert log.count("admin key: lmaas-") == 1 and "shown ONCE" in log
    assert "Authorization: Bearer $LMAAS_API_KEY" in log  # the banner's curl examples
    for path in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/v2/models/echo", "/v2"):
        response = httpx.get(f"{secure.base_url}{path}")
        assert response.status_code == 401, path
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{secure.base_url}/v1/chat/completions", json=chat).status_code == 401
    assert httpx.get(f"{secure.base_url}/health").status_code == 200
    listed = httpx.get(f"{secure.base_url}/v1/models", headers=_admin(secure)).json()["data"]
    assert {m["id"] for m in listed} == {"echo", "secret-echo"}


def test_a_scoped_key_sees_and_calls_only_its_model(secure: ServerProcess) -> None:
    key = _new_key(secure, "team-a", scopes=["inference"], models=["echo"])
    client = OpenAI(base_url=f"{secure.base_url}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["echo"]
    reply = client.completions.create(model="echo", prompt="a b c", max_tokens=3)
    assert reply.choices[0].text == "a b c"
    messages: dict[str, str] = {}
    for model in ("secret-echo", "ghost"):
        with pytest.raises(NotFoundError) as caught:
            client.completions.create(model=model, prompt="x", max_tokens=1)
        messages[model] = str(caught.value).replace(model, "<m>")
        v2 = httpx.get(f"{secure.base_url}/v2/models/{model}", headers={"x-api-key": key})
        assert v2.status_code == 404
    assert messages["secret-echo"] == messages["ghost"]  # a hidden model leaks nothing
    admin_route = httpx.get(f"{secure.base_url}/admin/keys", headers={"x-api-key": key})
    assert admin_route.status_code == 403  # an inference key on an admin route


def test_revoked_and_expired_keys_get_401(secure: ServerProcess) -> None:
    url = f"{secure.base_url}/v1/models"
    expiring = _new_key(secure, "team-b", scopes=["models:read"], expires_in="1s")
    assert httpx.get(url, headers={"x-api-key": expiring}).status_code == 200
    time.sleep(1.2)
    expired = httpx.get(url, headers={"x-api-key": expiring})
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]

    key = _new_key(secure, "team-b", scopes=["models:read"])
    key_id = key.split("-")[1]
    revoke = httpx.post(f"{secure.base_url}/admin/keys/{key_id}/revoke", headers=_admin(secure))
    assert revoke.status_code == 200
    revoked = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]


def test_keys_made_by_the_cli_work_on_the_running_server(secure: ServerProcess) -> None:
    home = secure.log_path.parent
    assert _cli(home, "tenants", "create", "team-cli").returncode == 0
    made = _cli(home, "keys", "create", "--tenant", "team-cli", "--scope", "inference")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    SECRETS.append(key)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "secret-echo", "prompt": "p q", "max_tokens": 2}
    response = httpx.post(f"{secure.base_url}/v1/completions", json=body, headers=headers)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "p q"
    listed = httpx.get(f"{secure.base_url}/admin/keys?tenant=team-cli", headers=_admin(secure))
    assert [k["prefix"] for k in listed.json()["data"]] == [key.rsplit("-", 1)[0][:18]]
    assert _cli(home, "keys", "revoke", key.split("-")[1]).returncode == 0
    response = httpx.post(f"{secure.base_url}/v1/completions", json=body, headers=headers)
    assert response.status_code == 401


def test_the_db_never_holds_a_key_in_clear(secure: ServerProcess) -> None:
    home = secure.log_path.parent
    assert len(SECRETS) >= 4
    files = [p for p in home.iterdir() if p.name.startswith("lmaas.db")]
    data = b"".join(p.read_bytes() for p in files)
    for secret in SECRETS:
        assert secret.split("-", 2)[2].encode() not in data


def test_the_first_secure_start_prints_the_admin_key_and_a_restart_does_not(
    tmp_path: Path, tiny_dirs: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    _import_echo_models(home, tiny_dirs["chat"], ["echo"])
    open_start = start_server(home, ["echo"])  # --no-auth: no admin key is made or printed
    try:
        open_start.wait_ready(120)
        assert open_start.admin_key is None and "Authentication is OFF" in open_start.log()
        assert httpx.get(f"{open_start.base_url}/v1/models").status_code == 200
    finally:
        open_start.stop()
    first = start_server(home, ["echo"], auth=True)
    try:
        first.wait_ready(120)
        admin = first.admin_key
        assert admin is not None
    finally:
        first.stop()
    again = start_server(home, ["echo"], auth=True)
    try:
        again.wait_ready(120)
        assert again.admin_key is None and admin not in again.log()
        headers = {"Authorization": f"Bearer {admin}"}
        assert httpx.get(f"{again.base_url}/admin/keys", headers=headers).status_code == 200
    finally:
        again.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_no_auth_is_refused_off_loopback(tmp_path: Path, host: str) -> None:
    command = [sys.executable, "-m", "lmaas.cli", "serve", "--no-auth", "--host", host]
    command += ["--home", str(tmp_path / "home"), "--port", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"--no-auth is refused when binding to '{host}'" in done.stderr


def test_a_rate_limited_key_gets_429_with_retry_after(secure: ServerProcess) -> None:
    key = _new_key(secure, "team-r", scopes=["inference"], limits={"rpm": 2})
    client = OpenAI(base_url=f"{secure.base_url}/v1", api_key=key, max_retries=0)
    for _ in range(2):
        client.completions.create(model="echo", prompt="a", max_tokens=1)
    with pytest.raises(RateLimitError) as caught:
        client.completions.create(model="echo", prompt="a", max_tokens=1)
    assert caught.value.status_code == 429
    assert int(caught.value.response.headers["retry-after"]) == 30
    assert caught.value.code == "rate_limit_exceeded"
