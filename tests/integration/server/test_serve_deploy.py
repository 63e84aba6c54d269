"""Deployments through a real ``lmaas serve`` with real worker processes (the fake echo runner,
no torch): a 10% canary gets 10 ± 2% of 2,000 requests, promotion, a rollback under load that
fails no request, the promotion gate, the automatic rollback of a failing canary, and the
history and audit rows of every change. Changes are made with the ``lmaas deploy`` CLI (which
writes the DB; the server polls it) and with ``/admin/deployments``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmaas.registry.lifecycle_db import StoredMetric
from lmaas.registry.service import RegistryService
from tests.integration.server.conftest import ECHO
from tests.integration.serverproc import ServerProcess, start_server

VERSION_HEADER = "x-lmaas-model-version"
ACCURACY = {"1": 0.90, "2": 0.91, "4": 0.50}
"""Stored evaluations: 2 is as good as 1, 4 is much worse; 3 (which fails) and 5 (which is
slow) have none."""


def _metric(value: float) -> StoredMetric:
    return StoredMetric("accuracy", value, "a" * 64, "eval.jsonl", "test", 50, datetime.now(UTC))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("deploy") / "home"
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        for version in ("1", "2", "3", "4", "5"):
            options = {"runner": ECHO, "token_delay_s": "0.002"}
            if version == "3":
                options["fail_requests"] = "1"
            if version == "5":  # 100 times slower per token
                options["token_delay_s"] = "0.2"
            manifest = registry.import_model(
                str(tiny_dirs["chat"]), name="echo", task=None, serving={"options": options}
            )
            assert manifest.version == version
            if version in ACCURACY:
                registry.add_metrics(manifest, [_metric(ACCURACY[version])])
    return home


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ServerProcess]:
    proc = start_server(
        home,
        ["echo:1"],
        env={
            "LMAAS_DEPLOY__MIN_REQUESTS": "10",
            "LMAAS_DEPLOY__POLL_INTERVAL_S": "0.5",
            # A short window, so that the load of one test is not the baseline of the next.
            "LMAAS_DEPLOY__WINDOW_S": "8",
            # Far above the noise of a loaded 2-core machine; version 5 is 100 times slower.
            "LMAAS_DEPLOY__LATENCY_FACTOR": "10",
        },
    )
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.stop()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lmaas.cli", "deploy", *args, "--home", str(home)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _deploy(home: Path, *args: str) -> int:
    """Run ``lmaas deploy NAME ARGS`` and return the revision it wrote."""
    done = _cli(home, "echo", *args, "--json")
    assert done.returncode == 0, done.stderr
    revision: int = json.loads(done.stdout)["revision"]
    return revision


def _live(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/admin/deployments/echo", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _wait_applied(server: ServerProcess, revision: int, timeout_s: float = 60) -> dict[str, Any]:
    """Until the server routes ``revision`` with every replica ready and none draining."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = _live(server)["live"]
        settled = live["revision"] >= revision and live["draining_replicas"] == 0
        if settled and all(v["state"] == "ready" for v in live["versions"]):
            return live
        assert time.monotonic() < deadline, f"revision {revision} not applied: {live}"
        time.sleep(0.1)


def _complete(client: httpx.Client, model: str = "echo", **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "a b c", "max_tokens": 3, **extra}
    return client.post("/v1/completions", json=body, timeout=30)


def _served_versions(
    server: ServerProcess, count: int, model: str = "echo", clients: int = 1
) -> Counter[str]:
    """Send ``count`` requests from ``clients`` threads; which version served each."""
    versions: Counter[str] = Counter()

    def run(n: int) -> None:
        with httpx.Client(base_url=server.base_url) as client:
            for _ in range(n):
                response = _complete(client, model, max_tokens=1)
                assert response.status_code == 200, response.text
                assert response.json()["model"] == "echo"
                versions[response.headers[VERSION_HEADER]] += 1

    threads = [threading.Thread(target=run, args=(count // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(versions.values()) == count
    return versions


def test_a_ten_percent_canary_gets_ten_percent_of_2000_requests(
    server: ServerProcess, home: Path
) -> None:
    _wait_applied(server, _deploy(home, "--version", "1"))
    live = _wait_applied(server, _deploy(home, "--canary", "2", "--percent", "10"))
    assert [(v["version"], v["weight"]) for v in live["versions"]] == [("1", 90), ("2", 10)]
    versions = _served_versions(server, 2000, clients=8)
    share = versions["2"] / 2000
    assert 0.08 <= share <= 0.12, versions
    # A client naming a version gets that version, canary or not.
    assert _served_versions(server, 20, "echo:1") == {"1": 20}
    assert _served_versions(server, 20, "echo:2") == {"2": 20}
    missing = httpx.post(
        f"{server.base_url}/v1/completions", json={"model": "echo:4", "prompt": "a"}
    )
    assert missing.status_code == 404
    assert "this server serves echo:1" in missing.json()["error"]["message"]


def test_promote_then_roll_back_under_load_fails_no_request(
    server: ServerProcess, home: Path
) -> None:
    _wait_applied(server, _deploy(home, "--version", "1", "--replicas", "2"))
    _wait_applied(server, _deploy(home, "--canary", "2", "--percent", "10"))
    live = _wait_applied(server, _deploy(home, "--promote"))
    assert [(v["version"], len(v["replicas"])) for v in live["versions"]] == [("2", 2)]
    assert _served_versions(server, 20) == {"2": 20}

    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    failures: list[str] = []

    def client_loop(stream: bool) -> None:
        with httpx.Client(base_url=server.base_url) as client:
            while not stop.is_set():
                try:
                    if stream:
                        body = {"model": "echo", "prompt": "a b", "max_tokens": 20, "stream": True}
                        with client.stream("POST", "/v1/completions", json=body) as response:
                            lines = [ln for ln in response.iter_lines() if ln]
                        ok = response.status_code == 200 and lines[-1] == "data: [DONE]"
                        ok = ok and not any('"error"' in ln for ln in lines)
                    else:
                        response = _complete(client)
                        ok = response.status_code == 200
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if not ok:
                    failures.append(f"{response.status_code}")
                else:
                    outcomes[response.headers[VERSION_HEADER]] += 1

    threads = [threading.Thread(target=client_loop, args=(i % 2 == 0,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        done = _cli(home, "echo", "--rollback", "--json")  # back to the previous stable: 1
        assert done.returncode == 0, done.stderr
        live = _wait_applied(server, json.loads(done.stdout)["revision"])
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert outcomes["1"] > 0 and outcomes["2"] > 0, outcomes
    assert [(v["version"], len(v["replicas"])) for v in live["versions"]] == [("1", 2)]
    assert _served_versions(server, 20) == {"1": 20}


def test_the_gate_refuses_a_worse_version(server: ServerProcess, home: Path) -> None:
    _wait_applied(server, _deploy(home, "--version", "1", "--replicas", "1"))
    revision = _wait_applied(server, _deploy(home, "--canary", "4", "--percent", "10"))["revision"]
    refused = _cli(home, "echo", "--promote")
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "accuracy of echo:4 is 0.5000" in refused.stderr
    response = httpx.post(f"{server.base_url}/admin/deployments/echo/promote", json={})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "gate_refused"
    assert _live(server)["revision"] == revision  # nothing changed
    done = _cli(home, "echo", "--rollback")
    assert done.returncode == 0, done.stderr


def test_a_failing_canary_is_rolled_back_automatically(server: ServerProcess, home: Path) -> None:
    _wait_applied(server, _deploy(home, "--version", "1"))
    response = httpx.post(
        f"{server.base_url}/admin/deployments/echo/canary", json={"version": "3", "percent": 50}
    )
    assert response.status_code == 200, response.text
    assert response.json()["canary"] == "3"
    _wait_applied(server, response.json()["revision"])
    deadline = time.monotonic() + 60
    codes: Counter[int] = Counter()
    with httpx.Client(base_url=server.base_url) as client:
        while _live(server)["canary"] is not None:
            assert time.monotonic() < deadline, f"no automatic rollback: {codes}"
            codes[_complete(client).status_code] += 1
    assert codes[500] >= 10  # the canary's errors the guard saw
    last = _history(home)[-1]
    assert last["action"] == "auto-rollback" and last["actor"] == "system:canary-guard"
    assert "canary error rate" in last["reason"]
    live = _wait_applied(server, last["revision"])
    assert [v["version"] for v in live["versions"]] == ["1"]
    assert _served_versions(server, 10) == {"1": 10}


def test_a_slow_canary_is_rolled_back_automatically(server: ServerProcess, home: Path) -> None:
    _wait_applied(server, _deploy(home, "--version", "1"))
    response = httpx.post(
        f"{server.base_url}/admin/deployments/echo/canary", json={"version": "5", "percent": 50}
    )
    assert response.status_code == 200, response.text
    _wait_applied(server, response.json()["revision"])
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=server.base_url) as client:
        while _live(server)["canary"] is not None:
            assert time.monotonic() < deadline, "no automatic rollback"
            assert _complete(client).status_code == 200  # slow, never failing
    last = _history(home)[-1]
    assert last["action"] == "auto-rollback" and "canary p99 latency" in last["reason"]


def _history(home: Path) -> list[dict[str, Any]]:
    done = _cli(home, "history", "echo", "--json")
    assert done.returncode == 0, done.stderr
    changes: list[dict[str, Any]] = json.loads(done.stdout)
    return changes


def test_every_change_is_in_the_history_and_the_audit_trail(
    server: ServerProcess, home: Path
) -> None:
    history = _history(home)
    assert history[0]["action"] == "serve" and history[0]["actor"] == "system:serve"
    actions = {c["action"] for c in history}
    assert {"set", "canary", "promote", "rollback", "auto-rollback"} <= actions
    assert [c["revision"] for c in history] == list(range(1, len(history) + 1))
    api = httpx.get(f"{server.base_url}/admin/deployments/echo/history").json()["data"]
    assert [c["revision"] for c in api] == [c["revision"] for c in history]
    audit = httpx.get(
        f"{server.base_url}/admin/audit", params={"target": "echo", "limit": 1000}
    ).json()["data"]
    assert len(audit) == len(history)
    assert {r["action"] for r in audit} == {f"deployment.{a}" for a in actions}
    assert any(r["actor"] == "local:no-auth" for r in audit)  # the admin API's change
    assert httpx.get(f"{server.base_url}/admin/audit/verify").json()["ok"] is True
    listed = httpx.get(f"{server.base_url}/admin/deployments").json()["data"]
    assert [d["name"] for d in listed] == ["echo"]
    openapi = httpx.get(f"{server.base_url}/openapi.json").json()
    assert "/admin/deployments/{name}/promote" in openapi["paths"]
