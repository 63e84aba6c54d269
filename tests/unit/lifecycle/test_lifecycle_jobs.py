"""``/admin/jobs``: the CLI's option rules, the job table (progress, result, cancel, log).

The job programs themselves (torch) run in the integration tests; here a stand-in program
speaks the same event protocol, so the table's behaviour is checked in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from lmaas.api import ApiServices, DefaultApiConfig, create_app
from lmaas.core.errors import InvalidRequestError
from lmaas.lifecycle.job_params import (
    CompressParams,
    LifecycleJobs,
    LifecycleJobSpec,
    parse_params,
)
from lmaas.observability.metrics import Metrics
from lmaas.testing.fakes import FakeEngineClient

FAKE_JOB = textwrap.dedent(
    """
    import json, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as run_job does
    def say(**event):
        print(json.dumps(event), flush=True)
    say(event="start", total=3, description="training fake")
    print("a library's stray line", flush=True)
    print("epoch 1 done", file=sys.stderr, flush=True)
    if "--slow" in sys.argv:
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("cancelled: no version was registered", file=sys.stderr, flush=True)
            sys.exit(130)
    if "--fail" in sys.argv:
        say(event="error", code="model_not_found", message="model 'nope' does not exist")
        sys.exit(1)
    say(event="progress", done=3)
    say(event="result", result={"version": "fake:1", "metrics": {"accuracy": 1.0},
                                "lineage": {"parent": None, "transform": "train"}})
    """
)


@pytest.mark.parametrize(
    ("kind", "params", "param"),
    [
        ("train-image-classifier", {"name": "d"}, "params"),
        ("train-image-classifier", {"name": "d", "sklearn_digits": True, "epochs": 0},
         "params.epochs"),
        ("train-image-classifier", {"name": "d", "sklearn_digits": True, "hidden_size": 30},
         "params"),
        ("train-text-classifier", {"name": "t", "data": "/x.jsonl"}, "params.base"),
        ("train-chat-lora", {"name": "c", "data": "/x", "base": "b", "dropout": 2},
         "params.dropout"),
        ("compress", {"model": "d:1"}, "params"),
        ("compress", {"model": "d:1", "prune": 1.5}, "params.prune"),
        ("compress", {"model": "d:1", "int8": True, "bogus": 1}, "params.bogus"),
        ("convert", {"model": "d:1"}, "params"),
        ("retrain", {}, "kind"),
    ],
)  # fmt: skip
def test_bad_params_name_the_field(kind: str, params: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_params(kind, params)
    assert caught.value.param == param


def test_params_become_the_clis_job_arguments(tmp_path: Path) -> None:
    params = parse_params("compress", {"model": "digits:1", "int8": True, "sklearn_digits": True})
    assert isinstance(params, CompressParams)
    assert params.job_args() == ["digits:1", "--int8", "--sklearn-digits"]
    spec = LifecycleJobSpec("compress", params, tmp_path, "sqlite:///x.db")
    assert spec.argv()[1:3] == ["-m", "lmaas.lifecycle.jobs.compress"]
    assert spec.argv()[-4:] == ["--home", str(tmp_path), "--database-url", "sqlite:///x.db"]
    train = parse_params(
        "train-image-classifier", {"name": "d", "sklearn_digits": True, "epochs": 2}
    ).job_args()
    assert train[:3] == ["image-classifier", "--sklearn-digits", "--name"]
    assert train[-2:] == ["--epochs", "2"]


@pytest.fixture
def fake_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    program = tmp_path / "fake_job.py"
    program.write_text(FAKE_JOB)

    def argv(self: LifecycleJobSpec) -> list[str]:
        return [sys.executable, str(program), *self.params.job_args()]

    monkeypatch.setattr(LifecycleJobSpec, "argv", argv)


async def _wait(client: httpx.AsyncClient, job_id: str, until: set[str]) -> dict[str, object]:
    for _ in range(300):
        job: dict[str, object] = (await client.get(f"/admin/jobs/{job_id}")).json()
        if job["status"] in until:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} is not {until}")


@pytest.mark.anyio
async def test_admin_jobs_run_report_cancel_and_log(fake_job: None, tmp_path: Path) -> None:
    jobs = LifecycleJobs(tmp_path, "sqlite:///unused.db")
    services = ApiServices(
        engine=FakeEngineClient(), config=DefaultApiConfig(), metrics=Metrics(), jobs=jobs
    )
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            bad = await client.post(
                "/admin/jobs", json={"kind": "compress", "params": {"model": "d:1", "prune": 2}}
            )
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "params.prune"
            relative = {"model": "d:1", "int8": True, "data": "rel.jsonl"}
            bad = await client.post("/admin/jobs", json={"kind": "compress", "params": relative})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "params.data"
            unknown = await client.post("/admin/jobs", json={"kind": "retrain", "params": {}})
            assert unknown.status_code == 400, unknown.text

            body = {
                "kind": "train-image-classifier",
                "params": {"name": "fake", "sklearn_digits": True},
            }
            created = await client.post("/admin/jobs", json=body)
            assert created.status_code == 202, created.text
            assert created.json()["status"] == "queued"
            assert created.json()["actor"] == "local:no-auth"
            job = await _wait(client, created.json()["id"], {"succeeded", "failed"})
            assert job["status"] == "succeeded", job
            assert job["progress"] == {"done": 3, "total": 3}
            assert job["description"] == "training fake"
            assert job["result"] == {
                "version": "fake:1",
                "metrics": {"accuracy": 1.0},
                "lineage": {"parent": None, "transform": "train"},
            }
            log = await client.get(f"/admin/jobs/{job['id']}/log")
            assert log.status_code == 200 and "epoch 1 done" in log.text

            failing = {
                "kind": "compress",
                "params": {"model": "nope", "int8": True, "name": "--fail"},
            }
            failed = await _wait(
                client, (await client.post("/admin/jobs", json=failing)).json()["id"], {"failed"}
            )
            assert failed["error"] == {
                "code": "model_not_found",
                "message": "model 'nope' does not exist",
            }

            slow = {"kind": "compress", "params": {"model": "d:1", "int8": True, "name": "--slow"}}
            running = (await client.post("/admin/jobs", json=slow)).json()["id"]
            queued = (await client.post("/admin/jobs", json=slow)).json()["id"]
            await _wait(client, running, {"running"})
            for _ in range(100):  # the program has started and printed its first line
                if "epoch 1" in (await client.get(f"/admin/jobs/{running}/log")).text:
                    break
                await asyncio.sleep(0.05)
            cancelled = await client.post(f"/admin/jobs/{queued}/cancel")
            assert cancelled.status_code == 200
            assert (await _wait(client, queued, {"cancelled"}))["started_at"] is None
            await client.post(f"/admin/jobs/{running}/cancel")
            stopped = await _wait(client, running, {"cancelled", "failed", "succeeded"})
            assert stopped["status"] == "cancelled", stopped
            log = (await client.get(f"/admin/jobs/{running}/log")).text
            assert "no version was registered" in log

            listed = (await client.get("/admin/jobs")).json()["data"]
            assert [j["id"] for j in listed][:2] == [queued, running]
            assert (await client.get("/admin/jobs/job-nope")).status_code == 404
            assert (await client.post("/admin/jobs/job-nope/cancel")).status_code == 404
    finally:
        await jobs.aclose()


@pytest.mark.anyio
async def test_admin_jobs_without_a_table_are_501() -> None:
    services = ApiServices(engine=FakeEngineClient(), config=DefaultApiConfig(), metrics=Metrics())
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/admin/jobs")).status_code == 501
