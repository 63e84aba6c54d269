"""``lmaas deploy --wait`` and deployments that follow an alias, on two real servers sharing a
DB (fake echo runner, no torch in the workers): ``whole`` serves the store (no ``--model``),
``pinned`` serves ``--model echo`` only.

* ``--wait`` returns once both servers route the new revision with its replicas ready (no
  polling of ``/ready`` after it), ``GET /admin/deployments/echo`` shows the fleet; a new name
  that cannot load makes it exit 1 with the load error, a scale-up it cannot see finished in
  time exits 2; ``--stop --wait`` returns once no server serves the name.
* ``--follow-alias production``: moving the alias (admin API) redeploys the stable version on
  both servers (a ``follow`` change in history and audit); while a canary runs the move is
  refused (409) and the alias stays.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server.conftest import import_echo
from tests.integration.serverproc import ServerProcess, start_server

ENV = {"LMAAS_DEPLOY__POLL_INTERVAL_S": "0.5"}
VERSION_HEADER = "x-lmaas-model-version"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("deploy-wait") / "home"
    for _ in range(3):
        import_echo(home, tiny_dirs["chat"], "echo")
    return home


@pytest.fixture(scope="module")
def servers(home: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    assert _cli(home, "deploy", "echo", "--version", "1").returncode == 0
    whole = start_server(home, [], env=ENV)
    pinned: ServerProcess | None = None
    try:
        whole.wait_ready(60)
        pinned = start_server(home, ["echo"], env=ENV)
        pinned.wait_ready(60)
        yield whole, pinned
    finally:
        whole.stop()
        if pinned is not None:
            pinned.stop()


def _cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lmaas.cli", *args, "--home", str(home)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _ready(server: ServerProcess, name: str, version: str) -> bool:
    url = f"{server.base_url}/v2/models/{name}/versions/{version}/ready"
    return httpx.get(url, timeout=10).status_code == 200


def _versions(server: ServerProcess, n: int = 4) -> set[str]:
    body = {"model": "echo", "prompt": "a b", "max_tokens": 1}
    url = f"{server.base_url}/v1/completions"
    found = set()
    for _ in range(n):
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 200, response.text
        found.add(response.headers[VERSION_HEADER])
    return found


def _deployment(server: ServerProcess, name: str = "echo") -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/admin/deployments/{name}", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_wait_returns_once_every_server_routes_the_revision(
    servers: tuple[ServerProcess, ServerProcess], home: Path
) -> None:
    whole, pinned = servers
    done = _cli(home, "deploy", "echo", "--canary", "2", "--percent", "50", "--wait")
    assert done.returncode == 0, done.stderr
    assert "2 server(s) did apply revision" in done.stderr, done.stderr
    # No polling: both servers route the canary the moment --wait returned.
    assert _ready(whole, "echo", "2") and _ready(pinned, "echo", "2")
    fleet = _deployment(whole)["fleet"]
    assert fleet["done"] and len(fleet["gateways"]) == 2, fleet
    revision = fleet["revision"]
    assert {g["revision"] for g in fleet["gateways"]} == {revision}
    assert all(g["versions"]["2"] == {"ready": 1, "replicas": 1} for g in fleet["gateways"])

    # A scale-up cannot be seen finished at once: exit 2 with what is still pending.
    late = _cli(home, "deploy", "echo", "--replicas", "2", "--wait", "--timeout", "0")
    assert late.returncode == 2, late.stderr
    assert "timed out after 0 s" in late.stderr and "applying" in late.stderr, late.stderr
    status = _cli(home, "deploy", "status", "echo", "--wait", "--json")
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["done"] and all(g["versions"]["1"]["ready"] == 2 for g in body["gateways"]), body
    assert _cli(home, "deploy", "echo", "--version", "1", "--wait").returncode == 0
    assert _versions(whole) == _versions(pinned) == {"1"}


def test_wait_reports_a_load_failure_and_a_stop(
    servers: tuple[ServerProcess, ServerProcess], home: Path, tiny_dirs: dict[str, Path]
) -> None:
    whole, pinned = servers
    import_echo(home, tiny_dirs["chat"], "broken", fail_load="the weights are corrupt")
    failed = _cli(home, "deploy", "broken", "--version", "1", "--wait", "--timeout", "90")
    assert failed.returncode == 1, failed.stderr
    assert "could not apply revision 1 of broken" in failed.stderr, failed.stderr
    assert "the weights are corrupt" in failed.stderr, failed.stderr
    fleet = httpx.get(f"{whole.base_url}/admin/deployments/broken/fleet", timeout=10).json()
    assert len(fleet["gateways"]) == 1 and not fleet["done"], fleet  # pinned does not serve it
    # The server tries again with backoff (5 s, 10 s, ...): the tries show in both views.
    retry = fleet["gateways"][0]["retry"]
    assert retry["revision"] == 1 and retry["attempts"] >= 1, fleet
    live = httpx.get(f"{whole.base_url}/admin/deployments/broken", timeout=10).json()["live"]
    assert "the weights are corrupt" in live["error"] and live["retry"]["attempts"] >= 1, live
    assert 0 <= live["retry"]["next_retry_in_s"] <= 300, live
    stopped = _cli(home, "deploy", "broken", "--stop", "--wait")
    assert stopped.returncode == 0, stopped.stderr
    assert "did stop serving broken" in stopped.stderr, stopped.stderr
    assert httpx.get(f"{pinned.base_url}/admin/deployments/broken/fleet").json()["done"]


def test_a_deployment_follows_its_alias_and_a_canary_holds_the_alias(
    servers: tuple[ServerProcess, ServerProcess], home: Path
) -> None:
    whole, pinned = servers
    url = f"{whole.base_url}/admin/models/echo/aliases/production"
    assert httpx.put(url, json={"version": "1"}, timeout=10).status_code == 200
    done = _cli(home, "deploy", "echo", "--follow-alias", "production", "--wait")
    assert done.returncode == 0 and "follows echo@production" in done.stdout, done.stderr

    # The alias moves: the deployment moves with it, in the same transaction.
    moved = httpx.put(url, json={"version": "3"}, timeout=10)
    assert moved.status_code == 200, moved.text
    view = _deployment(whole)
    assert (view["stable"], view["follow"]) == ("3", "production"), view
    assert _cli(home, "deploy", "echo", "--wait").returncode == 0  # waits for that revision
    assert _versions(whole) == _versions(pinned) == {"3"}
    history = json.loads(_cli(home, "deploy", "history", "echo", "--json").stdout)
    last = history[-1]
    assert (last["action"], last["spec"]["stable"], last["previous"]["stable"]) == (
        "follow",
        "3",
        "1",
    )
    assert last["reason"] == "echo@production moved 1 -> 3", last

    # A canary on trial: the move is refused and the alias stays where it was.
    assert _cli(home, "deploy", "echo", "--canary", "2", "--percent", "10").returncode == 0
    refused = httpx.put(url, json={"version": "1"}, timeout=10)
    assert refused.status_code == 409, refused.text
    assert "promote or roll back the canary first" in refused.json()["error"]["message"]
    assert httpx.get(url, timeout=10).json()["version"] == "3"
    # Rolling the canary back keeps the follow; the next move goes through (CLI this time).
    assert _cli(home, "deploy", "echo", "--rollback").returncode == 0
    moved_cli = _cli(home, "models", "alias", "echo", "production", "1")
    assert moved_cli.returncode == 0, moved_cli.stderr
    view = _deployment(whole)
    assert (view["stable"], view["follow"], view["canary"]) == ("1", "production", None)
    # Pinning a version ends the follow.
    assert _cli(home, "deploy", "echo", "--version", "1", "--wait").returncode == 0
    assert _deployment(pinned)["follow"] is None
