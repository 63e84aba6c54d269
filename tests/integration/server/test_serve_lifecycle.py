"""Aliases and evaluation through a real ``lmaas serve`` (tiny random-weight classifier).

The server is started with ``--model tiny-cls@production`` while ``tiny-cls`` has two versions;
clients call it by name, version or alias, and an evaluation job run by the server scores the
labels the server itself returned at 1.0 (its predictions are the ones the server serves).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmaas.gateway.service import GovernanceService
from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_text_heads import build_tiny_classifier, write_labelled_texts
from tests.integration.serverproc import ServerProcess, start_server

TEXTS = ["I love this", "This is terrible", "It is a table", "what a day", "zzz"]


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("lifecycle")
    source = build_tiny_classifier(root / "tiny-cls", seed=6)
    home = root / "home"
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    registry.import_model(str(source), name="tiny-cls")
    registry.import_model(str(source), name="tiny-cls")
    registry.set_alias("tiny-cls", "production", "1")
    registry.close()
    proc = start_server(home, ["tiny-cls@production"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _classify(server: ServerProcess, model: str) -> httpx.Response:
    body = {"model": model, "input": TEXTS}
    return httpx.post(f"{server.base_url}/v1/classify", json=body, timeout=60)


def test_served_version_is_the_alias_target(lifecycle_server: ServerProcess) -> None:
    (card,) = httpx.get(f"{lifecycle_server.base_url}/v1/models").json()["data"]
    assert card["id"] == "tiny-cls"
    meta = httpx.get(f"{lifecycle_server.base_url}/v2/models/tiny-cls@production").json()
    assert meta["versions"] == ["1"]
    for model in ("tiny-cls", "tiny-cls:1", "tiny-cls@production", "tiny-cls@latest"):
        response = _classify(lifecycle_server, model)
        if model.endswith("@latest"):  # latest is version 2, which this server does not serve
            assert response.status_code == 404
            assert "this server serves tiny-cls:1" in response.json()["error"]["message"]
            continue
        assert response.status_code == 200, (model, response.text)
    for model in ("tiny-cls:2", "tiny-cls@staging", "tiny-cls:1@production"):
        assert _classify(lifecycle_server, model).status_code == 404
    assert _classify(lifecycle_server, "tiny-cls").status_code == 200


def test_evaluation_job_scores_the_served_predictions(
    lifecycle_server: ServerProcess, tmp_path: Path
) -> None:
    served = _classify(lifecycle_server, "tiny-cls@production").json()["data"]
    rows = [{"text": t, "label": d["label"]} for t, d in zip(TEXTS, served, strict=True)]
    data = tmp_path / "served.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    base = lifecycle_server.base_url
    created = httpx.post(
        f"{base}/admin/evaluations", json={"model": "tiny-cls@production", "data": str(data)}
    )
    assert created.status_code == 202, created.text
    job = _wait(base, created.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["model"] == "tiny-cls:1"
    assert job["result"]["metrics"]["accuracy"] == 1.0
    assert job["progress"] == {"done": len(TEXTS), "total": len(TEXTS)}


def _wait(base: str, job_id: str, table: str = "evaluations") -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{base}/admin/{table}/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_moving_the_alias_is_seen_by_the_running_server(
    lifecycle_server: ServerProcess,
) -> None:
    home = lifecycle_server.log_path.parent
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        registry.set_alias("tiny-cls", "production", "2")
        try:
            time.sleep(1.2)  # the gateway caches an alias lookup for 1 s
            response = _classify(lifecycle_server, "tiny-cls@production")
            assert response.status_code == 404
            assert "(tiny-cls@production is version 2)" in response.json()["error"]["message"]
            assert _classify(lifecycle_server, "tiny-cls:1").status_code == 200
        finally:
            registry.set_alias("tiny-cls", "production", "1")
        assert [h.version for h in registry.history("tiny-cls")] == ["1", "2", "1"]


def test_admin_routes_move_the_alias_of_the_running_server(
    lifecycle_server: ServerProcess,
) -> None:
    base = lifecycle_server.base_url
    url = f"{base}/admin/models/tiny-cls/aliases/production"
    before = httpx.get(url).json()["version"]
    moved = httpx.put(url, json={"version": "2"})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["previous_version"], moved.json()["actor"]) == (before, "local:no-auth")
    try:
        time.sleep(1.2)  # the gateway caches an alias lookup for 1 s
        response = _classify(lifecycle_server, "tiny-cls@production")
        assert response.status_code == 404  # this server serves version 1 only
        assert "(tiny-cls@production is version 2)" in response.json()["error"]["message"]
        assert httpx.put(url, json={"version": "9"}).status_code == 404
    finally:
        back = httpx.put(url, json={"version": before})
    assert back.status_code == 200
    time.sleep(1.2)
    assert _classify(lifecycle_server, "tiny-cls@production").status_code == 200
    history = httpx.get(f"{base}/admin/models/tiny-cls/history").json()
    assert [h["version"] for h in history["aliases"]][-2:] == ["2", before]
    assert [v["version"] for v in history["versions"]] == ["1", "2"]
    # Each move is in the audit trail, written with the move.
    home = lifecycle_server.log_path.parent
    governance = GovernanceService.open(f"sqlite:///{home / 'lmaas.db'}")
    try:
        rows = governance.list_audit(limit=2, target="tiny-cls@production")
        assert [(r.actor, (r.after or {}).get("version")) for r in rows] == [
            ("local:no-auth", before),
            ("local:no-auth", "2"),
        ]
        assert governance.verify_audit().ok
    finally:
        governance.close()


def test_admin_jobs_compress_a_version_and_cancel_one(
    lifecycle_server: ServerProcess, tmp_path: Path
) -> None:
    """``POST /admin/jobs`` runs ``lmaas compress --int8`` in the server: the new version is in
    the registry with its lineage and metrics; a cancelled job registers nothing."""
    base = lifecycle_server.base_url
    data = write_labelled_texts(tmp_path / "labelled.jsonl", per_label=4)
    params = {"model": "tiny-cls:1", "int8": True, "name": "tiny-cls-int8", "data": str(data)}
    created = httpx.post(f"{base}/admin/jobs", json={"kind": "compress", "params": params})
    assert created.status_code == 202, created.text
    job = _wait(base, created.json()["id"], "jobs")
    assert job["status"] == "succeeded", job
    assert job["result"]["version"] == "tiny-cls-int8:1"
    assert job["result"]["lineage"]["parent"] == "tiny-cls:1"
    assert job["result"]["metrics"]["size_ratio"] > 1.0
    assert httpx.get(f"{base}/admin/jobs/{job['id']}/log").status_code == 200

    params = {**params, "name": "tiny-cls-cancelled"}
    created = httpx.post(f"{base}/admin/jobs", json={"kind": "compress", "params": params})
    cancel_id = created.json()["id"]
    while httpx.get(f"{base}/admin/jobs/{cancel_id}").json()["status"] == "queued":
        time.sleep(0.05)
    assert httpx.post(f"{base}/admin/jobs/{cancel_id}/cancel").status_code == 200
    assert _wait(base, cancel_id, "jobs")["status"] == "cancelled"

    home = lifecycle_server.log_path.parent
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        manifest = registry.resolve("tiny-cls-int8:1")
        assert manifest.lineage is not None and manifest.lineage.parent == "tiny-cls:1"
        assert [m.name for m in registry.list_models() if m.name.startswith("tiny-cls-c")] == []
    governance = GovernanceService.open(f"sqlite:///{home / 'lmaas.db'}")
    try:
        (row,) = governance.list_audit(limit=1, target=cancel_id)
        assert (row.action, row.actor) == ("job.create", "local:no-auth")
    finally:
        governance.close()
