"""``lmaas eval`` and ``/admin/evaluations``: the evaluation subprocess, end to end.

Tiny random-weight models: the numbers are meaningless, the pipeline is real (a subprocess
loads the model through the worker's runners, reports progress, stores the metrics).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from lmaas.api import ApiServices, DefaultApiConfig, create_app
from lmaas.cli.main import app as cli_app
from lmaas.core.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from lmaas.lifecycle.eval_jobs import EvalJobSpec, EvaluationJobs, JobStatus, run_evaluation
from lmaas.observability.metrics import Metrics
from lmaas.testing.fakes import FakeEngineClient


def database_url(home: Path) -> str:
    return f"sqlite:///{home / 'lmaas.db'}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(["good", "bad", "meh", "fine"])]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli_app, [*args, "--home", str(home)])
    return result.exit_code, result.stdout, result.stderr


def test_cli_eval_stores_and_compares(
    eval_home: Path, cls_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("LMAAS_HOME", "LMAAS_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = _cli(eval_home, "eval", "tiny-cls", "--data", str(cls_data), "--limit", "3")
    assert code == 0, err
    assert "accuracy" in out and "confusion matrix" in out and "per class" in out
    assert "3 examples" in " ".join(out.split())

    accuracy = float(next(line for line in out.splitlines() if "accuracy" in line).split()[-2])

    shown = yaml.safe_load(_cli(eval_home, "models", "show", "tiny-cls:1")[1])
    stored = [m for m in shown["registry"]["metrics"] if m["num_examples"] == 3]
    assert {m["metric"] for m in stored} >= {"accuracy", "f1_macro", "f1_weighted"}
    assert {m["dataset"] for m in stored} == {str(cls_data)}
    assert next(m["value"] for m in stored if m["metric"] == "accuracy") == pytest.approx(
        accuracy, abs=1e-4
    )

    code, out, _ = _cli(eval_home, "models", "compare", "tiny-cls:1", "tiny-cls@latest")
    assert code == 0 and "f1_macro" in out

    code, _, err = _cli(eval_home, "eval", "ghost", "--data", str(cls_data))
    assert code == 1 and "'ghost' does not exist" in err
    code, _, err = _cli(eval_home, "eval", "tiny-cls", "--data", str(cls_data), "--split", "x")
    assert code == 1 and "no row of cls.jsonl has split 'x'" in err


def test_run_evaluation_raises_what_the_job_reported(eval_home: Path, cls_data: Path) -> None:
    # Both fail before any model loads (the data is checked first), so this test is fast.
    with pytest.raises(ModelNotFoundError, match="tiny-cls:9"):
        run_evaluation(EvalJobSpec("tiny-cls:9", cls_data, eval_home, database_url(eval_home)))
    bad = cls_data.with_name("bad.jsonl")
    bad.write_text('{"text": "a"}\n')
    seen: list[int] = []
    with pytest.raises(InvalidRequestError, match=r"bad\.jsonl line 1: missing field 'label'"):
        spec = EvalJobSpec("tiny-cls", bad, eval_home, database_url(eval_home))
        run_evaluation(spec, on_done=seen.append)
    assert seen == []


@pytest.mark.anyio
async def test_admin_evaluations_run_as_background_jobs(eval_home: Path, cls_data: Path) -> None:
    jobs = EvaluationJobs(eval_home, database_url(eval_home))
    services = ApiServices(
        engine=FakeEngineClient(), config=DefaultApiConfig(), metrics=Metrics(), evaluations=jobs
    )
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"model": "tiny-embed", "data": str(cls_data), "limit": 2}
            bad = await client.post("/admin/evaluations", json={**body, "data": "rel.jsonl"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "data"
            created = await client.post("/admin/evaluations", json=body)
            assert created.status_code == 202, created.text
            failing_id = created.json()["id"]  # tiny-embed wants query/positive rows: it fails

            ok = await client.post("/admin/evaluations", json={**body, "model": "tiny-cls@latest"})
            job_id = ok.json()["id"]
            assert ok.json()["status"] == "queued"
            job = await _wait(client, job_id)
            assert job["status"] == JobStatus.SUCCEEDED.value, job
            assert job["progress"] == {"done": 2, "total": 2}
            assert job["result"]["model"] == "tiny-cls:1"
            assert "accuracy" in job["result"]["metrics"]

            failed = (await client.get(f"/admin/evaluations/{failing_id}")).json()
            assert failed["status"] == "failed"
            assert failed["error"]["code"] == "invalid_request"
            assert "missing field 'query'" in failed["error"]["message"]

            listed = (await client.get("/admin/evaluations")).json()["data"]
            assert [j["id"] for j in listed] == [job_id, failing_id]
            missing = await client.get("/admin/evaluations/eval-nope")
            assert missing.status_code == 404
    finally:
        await jobs.aclose()
    with pytest.raises(NotFoundError):
        jobs.get("eval-nope")


async def _wait(client: httpx.AsyncClient, job_id: str) -> dict[str, object]:
    for _ in range(600):
        job: dict[str, object] = (await client.get(f"/admin/evaluations/{job_id}")).json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.anyio
async def test_closing_cancels_running_jobs(eval_home: Path, cls_data: Path) -> None:
    jobs = EvaluationJobs(eval_home, database_url(eval_home))
    job = jobs.submit("tiny-cls", cls_data)
    await asyncio.sleep(0.2)  # the process has started
    await jobs.aclose()
    assert job.status is JobStatus.CANCELLED
    assert job.finished_at is not None
