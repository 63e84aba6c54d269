"""LocalEngineClient with real worker processes running the fake runners (no torch)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from lmaas.core.errors import (
    DrainingError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    WorkerCrashedError,
)
from lmaas.core.hashing import sha256_file
from lmaas.core.messages import (
    EmbedRequest,
    FileDigest,
    GenerateRequest,
    SamplingParams,
    WorkerSpec,
)
from lmaas.core.types import ModelState, Task
from lmaas.engine.local import Deployment, LocalEngineClient
from lmaas.engine.worker_handle import SupervisionPolicy

ECHO = "lmaas.testing.fake_runners:echo_runner"
EMBED = "lmaas.testing.fake_runners:hash_embedding_runner"
FAST_POLICY = SupervisionPolicy(start_timeout_s=30, backoff_initial_s=0.1, backoff_max_s=0.5)


def _deployment(
    name: str,
    runner: str,
    task: Task,
    model_dir: Path,
    files: list[FileDigest] | None = None,
    **options: str,
) -> Deployment:
    spec = WorkerSpec(
        model_name=name,
        model_version="1",
        task=task.value,
        format="safetensors",
        model_dir=str(model_dir),
        files=files or [],
        requests_endpoint="",
        results_endpoint="",
        options={"runner": runner, **options},
    )
    return Deployment(spec=spec, task=task, created_at=time.time())


def _run(
    deployments: list[Deployment], body: Callable[[LocalEngineClient], Awaitable[None]]
) -> None:
    async def main() -> None:
        engine = LocalEngineClient(deployments, FAST_POLICY)
        await engine.start()
        try:
            await body(engine)
        finally:
            await engine.aclose()

    asyncio.run(main())


def _request(request_id: str, prompt: str, max_tokens: int | None = None) -> GenerateRequest:
    return GenerateRequest(request_id, SamplingParams(max_tokens=max_tokens), prompt=prompt)


def test_generate_streams_and_embed(tmp_path: Path) -> None:
    deployments = [
        _deployment("echo", ECHO, Task.COMPLETION, tmp_path),
        _deployment("embed", EMBED, Task.EMBEDDING, tmp_path),
    ]

    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)
        assert engine.is_ready()
        deltas = [d async for d in engine.generate("echo", _request("r1", "a b c", 5))]
        assert "".join(d.text for d in deltas) == "a b c a b"
        assert deltas[0].prompt_tokens == 3
        assert deltas[-1].finish_reason == "length"
        result = await engine.embed("embed", EmbedRequest("r2", texts=["x", "y z"]))
        assert (result.num_inputs, result.dim, len(result.data)) == (2, 8, 64)
        with pytest.raises(InvalidRequestError):
            async for _ in engine.generate("echo", _request("r3", "a b", 10_000)):
                pass
        with pytest.raises(InvalidRequestError, match="does not generate"):
            async for _ in engine.generate("embed", _request("r4", "a")):
                pass
        with pytest.raises(ModelNotFoundError):
            await engine.embed("nope", EmbedRequest("r5", texts=["x"]))
        assert engine.num_in_flight() == 0

    _run(deployments, body)


def test_many_concurrent_streams(tmp_path: Path) -> None:
    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)

        async def one(i: int) -> str:
            request = _request(f"r{i}", f"w{i} x{i}", 6)
            return "".join([d.text async for d in engine.generate("echo", request)])

        outputs = await asyncio.gather(*(one(i) for i in range(40)))
        assert outputs == [f"w{i} x{i} w{i} x{i} w{i} x{i}" for i in range(40)]

    _run([_deployment("echo", ECHO, Task.COMPLETION, tmp_path)], body)


def test_closing_a_stream_aborts_it_in_the_worker(tmp_path: Path) -> None:
    deployment = _deployment("echo", ECHO, Task.COMPLETION, tmp_path, token_delay_s="0.02")

    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)
        stream = engine.generate("echo", _request("r1", "a b c", 200))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        assert engine.num_in_flight() == 0
        handle = engine.handle("echo")
        # The worker's heartbeat (every second) reports what it still runs.
        deadline = time.monotonic() + 5
        await asyncio.sleep(1.1)
        while handle.worker_num_running != 0:
            assert time.monotonic() < deadline, "the worker kept running an aborted request"
            await asyncio.sleep(0.1)

    _run([deployment], body)


def test_crash_fails_in_flight_with_503_and_restarts(tmp_path: Path) -> None:
    deployment = _deployment(
        "echo", ECHO, Task.COMPLETION, tmp_path, token_delay_s="0.01", crash_after_tokens="5"
    )

    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)
        handle = engine.handle("echo")
        with pytest.raises(WorkerCrashedError):
            async for _ in engine.generate("echo", _request("r1", "a b c", 50)):
                pass
        deadline = time.monotonic() + 20
        while handle.state is not ModelState.READY or handle.num_restarts == 0:
            assert time.monotonic() < deadline, "worker was not restarted"
            await asyncio.sleep(0.05)
        deltas = [d async for d in engine.generate("echo", _request("r2", "a b", 2))]
        assert "".join(d.text for d in deltas) == "a b"

    _run([deployment], body)


def test_killed_worker_is_restarted(tmp_path: Path) -> None:
    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)
        handle = engine.handle("echo")
        assert handle.worker_pid is not None
        os.kill(handle.worker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while handle.num_restarts == 0 or handle.state is not ModelState.READY:
            assert time.monotonic() < deadline, "worker was not restarted"
            if handle.state is not ModelState.READY:
                with pytest.raises(ModelNotReadyError):
                    await engine.embed("echo", EmbedRequest("x", texts=["a"]))
            await asyncio.sleep(0.02)
        assert engine.is_ready()

    _run([_deployment("echo", ECHO, Task.COMPLETION, tmp_path)], body)


def test_load_failure_is_reported_not_retried(tmp_path: Path) -> None:
    deployments = [
        _deployment("bad", ECHO, Task.COMPLETION, tmp_path, fail_load="weights are corrupt"),
        _deployment("good", ECHO, Task.COMPLETION, tmp_path),
    ]

    async def body(engine: LocalEngineClient) -> None:
        assert not await engine.wait_ready(30)
        bad = engine.get_model("bad")
        assert bad.state is ModelState.FAILED
        assert bad.error == "weights are corrupt"
        assert engine.get_model("good").state is ModelState.READY
        assert not engine.is_ready()
        await asyncio.sleep(0.5)
        assert engine.handle("bad").num_restarts == 0

    _run(deployments, body)


def test_checksum_mismatch_refuses_the_model(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"original")
    digest = FileDigest("model.safetensors", 8, sha256_file(weights))
    weights.write_bytes(b"tampered")
    deployment = _deployment("echo", ECHO, Task.COMPLETION, tmp_path, files=[digest])

    async def body(engine: LocalEngineClient) -> None:
        assert not await engine.wait_ready(30)
        served = engine.get_model("echo")
        assert served.state is ModelState.FAILED
        assert served.error is not None and "does not match its manifest" in served.error

    _run([deployment], body)


def test_draining_refuses_new_requests(tmp_path: Path) -> None:
    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)
        engine.begin_draining()
        assert not engine.is_ready()
        with pytest.raises(DrainingError):
            await engine.embed("echo", EmbedRequest("x", texts=["a"]))

    _run([_deployment("echo", ECHO, Task.COMPLETION, tmp_path)], body)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.parametrize(
    ("task", "runner", "operator_value", "expected"),
    [
        (Task.EMBEDDING, EMBED, None, "PASSIVE"),
        (Task.EMBEDDING, EMBED, "ACTIVE", "ACTIVE"),
        (Task.COMPLETION, ECHO, None, None),
        (Task.COMPLETION, ECHO, "PASSIVE", "PASSIVE"),
    ],
)
def test_one_result_workers_sleep_between_parallel_regions_unless_told_otherwise(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    task: Task,
    runner: str,
    operator_value: str | None,
    expected: str | None,
) -> None:
    if operator_value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", operator_value)

    async def body(engine: LocalEngineClient) -> None:
        assert await engine.wait_ready(30)
        pid = engine.handle("m").worker_pid
        assert pid is not None
        assert _environ(pid).get("OMP_WAIT_POLICY") == expected

    _run([_deployment("m", runner, task, tmp_path)], body)
