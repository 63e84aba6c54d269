"""Names deployed and stopped while real servers run (fake echo runner, no torch in the workers).

Two servers share one DB: ``whole`` was started without ``--model`` (it serves the store, names
deployed later included; with API keys), ``only_echo`` with ``--model echo`` (it serves exactly
that name). A name deployed with ``lmaas deploy`` appears on ``whole`` only: listed, callable,
hidden from keys scoped to other models, with metrics summed over its two replicas; stopped, it
drains (the stream in flight finishes) and goes; deployed again, it comes back.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server.conftest import import_echo
from tests.integration.serverproc import ServerProcess, start_server

ENV = {"LMAAS_DEPLOY__POLL_INTERVAL_S": "0.5", "LMAAS_AUTH__KEY_CACHE_TTL_S": "0"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("deploy-names") / "home"
    import_echo(home, tiny_dirs["chat"], "echo")
    return home


@pytest.fixture(scope="module")
def servers(home: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    whole = start_server(home, [], auth=True, env=ENV)
    only_echo: ServerProcess | None = None
    try:
        whole.wait_ready(60)
        only_echo = start_server(home, ["echo"], env=ENV)  # --no-auth (loopback)
        only_echo.wait_ready(60)
        yield whole, only_echo
    finally:
        whole.stop()
        if only_echo is not None:
            only_echo.stop()


def _deploy(home: Path, *args: str) -> Any:
    command = [sys.executable, "-m", "lmaas.cli", "deploy", *args, "--json", "--home", str(home)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _admin(server: ServerProcess) -> dict[str, str]:
    assert server.admin_key is not None
    return {"Authorization": f"Bearer {server.admin_key}"}


def _listed(server: ServerProcess, headers: dict[str, str]) -> set[str]:
    """The model ids /v1/models lists (a new name is listed once its replicas are ready)."""
    response = httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


def _metric(server: ServerProcess, pattern: str) -> float | None:
    text = httpx.get(f"{server.base_url}/metrics", headers=_admin(server), timeout=10).text
    found = re.search(pattern + r" ([0-9.e+-]+)", text)
    return None if found is None else float(found.group(1))


def _complete(
    server: ServerProcess, headers: dict[str, str], model: str, max_tokens: int = 2
) -> httpx.Response:
    body = {"model": model, "prompt": "a b", "max_tokens": max_tokens}
    return httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=60)


def _stream_in_thread(
    server: ServerProcess, headers: dict[str, str], max_tokens: int
) -> tuple[threading.Thread, list[str]]:
    """A streaming completion of 'late' in a thread; the list gets "ok" or what went wrong."""
    outcome: list[str] = []

    def run() -> None:
        body = {"model": "late", "prompt": "a b", "max_tokens": max_tokens, "stream": True}
        url = f"{server.base_url}/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
        tokens = sum(len(c["choices"][0]["text"].split()) for c in chunks if c.get("choices"))
        ok = response.status_code == 200 and lines[-1] == "data: [DONE]" and tokens == max_tokens
        outcome.append("ok" if ok else f"{response.status_code} {tokens} {lines[-2:]}")

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_name_deployed_while_running_is_served_scoped_measured_and_stopped(
    servers: tuple[ServerProcess, ServerProcess], home: Path, tiny_dirs: dict[str, Path]
) -> None:
    whole, only_echo = servers
    admin = _admin(whole)
    httpx.post(f"{whole.base_url}/admin/tenants", json={"name": "team"}, headers=admin)
    created = httpx.post(
        f"{whole.base_url}/admin/keys",
        json={"tenant": "team", "scopes": ["inference"], "models": ["echo"]},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    scoped = {"Authorization": f"Bearer {created.json()['secret']}"}
    assert (_listed(whole, admin)) == {"echo"}

    # A model registered and deployed while both servers run, on two replicas.
    import_echo(home, tiny_dirs["chat"], "late", token_delay_s="0.05")
    deployed = _deploy(home, "late", "--version", "1", "--replicas", "2")
    _until(lambda: "late" in _listed(whole, admin), "late is not served")
    reply = _complete(whole, admin, "late")
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "late" and reply.headers["x-lmaas-model-version"] == "1"
    live = httpx.get(f"{whole.base_url}/admin/deployments/late", headers=admin).json()["live"]
    assert live["revision"] == deployed["revision"]
    assert [len(v["replicas"]) for v in live["versions"]] == [2]

    # Key scopes hold for the new name: hidden and 404 like a name that does not exist.
    assert (_listed(whole, scoped)) == {"echo"}
    hidden, ghost = _complete(whole, scoped, "late"), _complete(whole, scoped, "ghost")
    assert hidden.status_code == ghost.status_code == 404
    assert hidden.json()["error"]["message"].replace("late", "<m>") == ghost.json()["error"][
        "message"
    ].replace("ghost", "<m>")
    assert _complete(whole, scoped, "echo").status_code == 200

    # The server started with --model echo serves exactly that name.
    time.sleep(1.5)  # three polls
    assert (_listed(only_echo, {})) == {"echo"}
    assert _complete(only_echo, {}, "late").status_code == 404
    stored = httpx.get(f"{only_echo.base_url}/admin/deployments/late").json()
    assert stored["revision"] == deployed["revision"] and stored["live"] is None

    # Metrics: the name's engine counters add up both replicas (4 streams, 2 on each).
    running = [_stream_in_thread(whole, admin, 120) for _ in range(4)]  # 6 s
    _until(
        lambda: _metric(whole, r'lmaas_engine_stat\{model="late",stat="running"\}') == 4,
        "lmaas_engine_stat running of late never reached 4",
        timeout_s=20,
    )
    ready = r'lmaas_replicas\{model="late",state="ready",version="1"\}'
    assert _metric(whole, ready) == 2
    by_version = r'lmaas_version_engine_stat\{model="late",stat="running",version="1"\}'
    assert _metric(whole, by_version) is not None
    assert _metric(whole, r'lmaas_worker_state\{model="late",state="ready"\}') == 1
    for thread, _ in running:
        thread.join(60)
    assert [outcome for _, outcome in running] == [["ok"]] * 4
    assert _metric(whole, r'lmaas_http_requests_total\{model="late",route="[^"]+",status="200"\}')

    # Stopped while a stream runs: the stream finishes, then the name is gone.
    thread, outcome = _stream_in_thread(whole, admin, 250)  # 12.5 s
    _until(
        lambda: (_metric(whole, r'lmaas_engine_stat\{model="late",stat="running"\}') or 0) >= 1,
        "the stream did not start",
        timeout_s=20,
    )
    stopped = _deploy(home, "late", "--stop")
    assert stopped["action"] == "stop" and stopped["revision"] == deployed["revision"] + 1
    _until(lambda: "late" not in _listed(whole, admin), "late is still listed")
    assert _complete(whole, admin, "late").status_code == 404
    assert thread.is_alive()  # still streaming from a draining replica
    thread.join(60)
    assert outcome == ["ok"]
    _until(
        lambda: (
            httpx.get(f"{whole.base_url}/admin/deployments/late", headers=admin).status_code == 404
        ),
        "the stopped deployment is still stored",
    )
    assert _metric(whole, r'lmaas_worker_state\{model="late",state="stopped"\}') == 1
    assert _metric(whole, r'lmaas_engine_stat\{model="late",stat="running"\}') is None
    assert _metric(whole, ready) is None

    # Deployed again: served again, the revisions go on.
    again = _deploy(home, "late", "--version", "1")
    assert again["revision"] == stopped["revision"] + 1
    _until(lambda: "late" in _listed(whole, admin), "late did not come back")
    assert _complete(whole, admin, "late").status_code == 200
    actions = [c["action"] for c in _deploy(home, "history", "late")]
    assert actions == ["set", "stop", "set"]
    # Stopped through the admin API: applied by this server at once.
    response = httpx.request(
        "DELETE",
        f"{whole.base_url}/admin/deployments/late",
        json={"reason": "done"},
        headers=admin,
    )
    assert response.status_code == 200, response.text
    assert response.json()["action"] == "stop" and response.json()["reason"] == "done"
    _until(lambda: "late" not in _listed(whole, admin), "late is still listed", timeout_s=10)
    gone = httpx.request("DELETE", f"{whole.base_url}/admin/deployments/late", headers=admin)
    assert gone.status_code == 404
    openapi = httpx.get(f"{whole.base_url}/openapi.json", headers=admin).json()
    assert "delete" in openapi["paths"]["/admin/deployments/{name}"]


def test_the_canary_guard_judges_the_traffic_of_both_gateways(
    servers: tuple[ServerProcess, ServerProcess], home: Path, tiny_dirs: dict[str, Path]
) -> None:
    whole, only_echo = servers
    headers = {whole.base_url: _admin(whole), only_echo.base_url: {}}
    import_echo(home, tiny_dirs["chat"], "echo", fail_requests="1")  # echo:2 fails every request
    started = _deploy(home, "echo", "--canary", "2", "--percent", "10")

    def routes_canary(server: ServerProcess) -> bool:
        url = f"{server.base_url}/admin/deployments/echo"
        live = httpx.get(url, headers=headers[server.base_url]).json()["live"]
        return live["revision"] == started["revision"] and all(
            v["state"] == "ready" for v in live["versions"]
        )

    for server in servers:
        _until(lambda server=server: routes_canary(server), "the canary is not applied")

    def fail_on(server: ServerProcess, count: int, rolled_back_after: int | None = None) -> None:
        for sent in range(count):
            response = _complete(server, headers[server.base_url], "echo:2")
            if response.status_code == 404 and rolled_back_after is not None:
                # The guard may act while this batch is still sending: once 20 are pooled,
                # version 2 leaves the routes and the rest of the batch finds it gone.
                assert sent >= rolled_back_after, (sent, response.text)
                return
            assert response.status_code == 500, response.text

    # 12 failures on one gateway: below the guard's 20 requests, nothing happens...
    fail_on(whole, 12)
    time.sleep(3)  # three guard rounds
    assert _deploy(home, "history", "echo")[-1]["action"] == "canary"
    # ...12 more on the other: 24 pooled, the canary goes.
    fail_on(only_echo, 12, rolled_back_after=20 - 12)
    _until(
        lambda: _deploy(home, "history", "echo")[-1]["action"] == "auto-rollback",
        "no automatic rollback on the pooled window",
        timeout_s=30,
    )
    last = _deploy(home, "history", "echo")[-1]
    assert last["actor"] == "system:canary-guard"
    # The guard acts on its first round with 20 or more pooled (each gateway has at most 12).
    pooled = re.search(r"error rate 100.0% \((\d+)/(\d+)\)", last["reason"])
    assert pooled is not None and pooled[1] == pooled[2] and 20 <= int(pooled[1]) <= 24
    assert last["reason"].endswith("(pooled over 2 gateways)")
