"""Usage metering and the audit trail on a real server (real worker, real SQLite DB, the CLI as
a separate process): N served requests are N usage rows with the tokens the clients were told,
none for refused requests; SIGTERM right after a burst loses nothing; SIGKILL loses at most the
last flush interval; ``lmaas audit verify`` names a row edited by hand."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmaas.gateway.usage_store import SqlUsageStore
from lmaas.registry.service import RegistryService
from tests.integration.server.conftest import ECHO
from tests.integration.serverproc import ServerProcess, start_server


def _import_echo(home: Path, source: Path) -> None:
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    try:
        registry.import_model(str(source), name="echo", serving={"options": {"runner": ECHO}})
    finally:
        registry.close()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMAAS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmaas.cli", *args, "--home", str(home)]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def _chat(base_url: str, headers: dict[str, str], text: str, stream: bool = False) -> Any:
    body: dict[str, Any] = {
        "model": "echo",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["usage"]
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    return json.loads(events[-1])["usage"]


def _burst(base_url: str, n: int, headers: dict[str, str] | None = None) -> list[Any]:
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(_chat, base_url, headers or {}, f"word {i} " * (1 + i % 5), i % 3 == 0)
            for i in range(n)
        ]
        return [f.result() for f in futures]


def _rows(home: Path) -> int:
    store = SqlUsageStore(f"sqlite:///{home / 'lmaas.db'}")
    try:
        return store.count()
    finally:
        store.close()


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Any:
    home = tmp_path_factory.mktemp("usage-home")
    _import_echo(home, tiny_dirs["chat"])
    proc = start_server(home, ["echo"], auth=True, env={"LMAAS_AUTH__KEY_CACHE_TTL_S": "0"})
    try:
        proc.wait_ready(120)
        yield home, proc
    finally:
        proc.stop()


def test_served_requests_are_metered_once_each_and_the_cli_agrees(
    metered: tuple[Path, ServerProcess],
) -> None:
    home, server = metered
    assert server.admin_key is not None
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    url = server.base_url
    assert httpx.post(f"{url}/admin/tenants", json={"name": "team"}, headers=admin).is_success
    created = httpx.post(
        f"{url}/admin/keys", json={"tenant": "team", "scopes": ["inference"]}, headers=admin
    )
    key = {"Authorization": f"Bearer {created.json()['secret']}"}
    key_id = created.json()["id"]
    told = _burst(url, 24, key)
    refused = [
        httpx.post(f"{url}/v1/chat/completions", json={"model": "echo"}),  # 401
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            headers=key,
        ),
        httpx.post(f"{url}/v1/chat/completions", json={"model": "echo", "n": -1}, headers=key),
    ]
    assert [r.status_code for r in refused] == [401, 404, 400]

    usage = httpx.get(f"{url}/admin/usage", params={"group_by": "key,model"}, headers=admin)
    assert usage.status_code == 200, usage.text
    (row,) = usage.json()["data"]
    assert (row["key"], row["model"], row["requests"]) == (key_id, "echo", 24)
    assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in told)
    assert row["completion_tokens"] == sum(u["completion_tokens"] for u in told)
    assert row["errors"] == 0 and row["cancelled"] == 0

    as_csv = _cli(home, "usage", "--group-by", "tenant", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    (line,) = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert (line["tenant"], line["requests"]) == ("team", "24")
    table = _cli(home, "usage", "-g", "tenant", "-g", "day")
    assert table.returncode == 0 and "team" in table.stdout

    # The audit trail: the API's and the CLI's changes, in one chain.
    assert _cli(home, "tenants", "create", "cli-team").returncode == 0
    listed = json.loads(_cli(home, "audit", "list", "--json").stdout)
    assert listed[0]["action"] == "tenant.create" and listed[0]["actor"].startswith("cli:")
    assert {r["actor"] for r in listed} >= {"system:bootstrap", f"lmaas-{server.admin_key[6:18]}"}
    assert _cli(home, "audit", "verify").returncode == 0
    with sqlite3.connect(home / "lmaas.db") as db:
        db.execute("UPDATE audit_log SET target = 'forged' WHERE seq = 2")
    broken = _cli(home, "audit", "verify")
    assert broken.returncode == 1 and "row 2" in broken.stderr
    verified = httpx.get(f"{url}/admin/audit/verify", headers=admin).json()
    assert verified["ok"] is False and verified["first_broken_seq"] == 2


def test_sigterm_right_after_a_burst_loses_no_usage_record(
    tmp_path: Path, tiny_dirs: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _import_echo(home, tiny_dirs["chat"])
    # Nothing would be written before the stop: only the shutdown flush can save the rows.
    env = {"LMAAS_USAGE__FLUSH_INTERVAL_MS": "60000", "LMAAS_USAGE__BATCH_SIZE": "100000"}
    server = start_server(home, ["echo"], env=env)
    try:
        server.wait_ready(120)
        _burst(server.base_url, 40)
        # uvicorn re-raises the signal once its graceful shutdown (lifespan included) is over
        assert server.stop() in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert "Application shutdown complete" in server.log()
    assert _rows(home) == 40


def test_sigkill_loses_at_most_the_last_flush_interval(
    tmp_path: Path, tiny_dirs: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _import_echo(home, tiny_dirs["chat"])
    server = start_server(home, ["echo"], env={"LMAAS_USAGE__FLUSH_INTERVAL_MS": "200"})
    try:
        server.wait_ready(120)
        _burst(server.base_url, 20)
        time.sleep(1.0)  # several flush intervals: these 20 are on disk now
        _burst(server.base_url, 10)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    finally:
        server.stop()
    assert 20 <= _rows(home) <= 30
