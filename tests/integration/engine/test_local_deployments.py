"""LocalEngineClient.apply with real worker processes (fake echo runner): weighted versions,
replicas, a switch that lets in-flight streams finish on the leaving replicas, and the
per-version outcome windows the canary guard reads."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest

from lmaas.core.errors import ModelNotFoundError
from lmaas.core.messages import GenerateRequest, SamplingParams, WorkerSpec
from lmaas.core.types import ModelState, Task
from lmaas.engine import deploy
from lmaas.engine.local import Deployment, LocalEngineClient, VersionStatus
from lmaas.engine.routing import CanaryGuard, GuardConfig, RoutedVersion, track_routed
from lmaas.engine.worker_handle import SupervisionPolicy

ECHO = "lmaas.testing.fake_runners:echo_runner"
POLICY = SupervisionPolicy(start_timeout_s=30, backoff_initial_s=0.1, backoff_max_s=0.5)


def _version(model_dir: Path, version: str, name: str = "echo", **options: str) -> Deployment:
    spec = WorkerSpec(
        model_name=name,
        model_version=version,
        task=Task.COMPLETION.value,
        format="safetensors",
        model_dir=str(model_dir),
        files=[],
        requests_endpoint="",
        results_endpoint="",
        options={"runner": ECHO, **options},
    )
    return Deployment(spec=spec, task=Task.COMPLETION, created_at=time.time())


def _request(i: int, max_tokens: int = 2) -> GenerateRequest:
    return GenerateRequest(f"r{i}", SamplingParams(max_tokens=max_tokens), prompt="a b")


async def _generate(engine: LocalEngineClient, i: int, model: str = "echo") -> tuple[str, str]:
    note: RoutedVersion = track_routed()
    text = "".join([d.text async for d in engine.generate(model, _request(i))])
    assert note.version is not None
    return note.version, text


def _pids(engine: LocalEngineClient) -> set[int]:
    live = engine.describe("echo")
    return {r["pid"] for v in live["versions"] for r in v["replicas"]}


def test_apply_routes_by_weight_scales_and_drains(tmp_path: Path) -> None:
    v1, v2 = _version(tmp_path, "1", token_delay_s="0.05"), _version(tmp_path, "2")

    async def main() -> None:
        states: list[tuple[str, ModelState]] = []
        engine = LocalEngineClient(
            [v1],
            POLICY,
            on_state=lambda name, state: states.append((name, state)),
            specs={"echo": deploy.single("echo", "1", 2)},
        )
        await engine.start()
        try:
            assert await engine.wait_ready(30)
            assert len(_pids(engine)) == 2
            # A long stream on version 1 is in flight while 2 takes over.
            long = asyncio.create_task(_long_stream(engine))
            await asyncio.sleep(0.2)
            old_pids = _pids(engine)
            canary = deploy.with_canary(deploy.single("echo", "1", 2), "2", 25)
            await engine.apply(canary, {"2": v2}, revision=2)
            assert engine.revision("echo") == 2
            results = [await _generate(engine, i) for i in range(40)]
            assert Counter(v for v, _ in results) == {"1": 30, "2": 10}
            assert {t for _, t in results} == {"a b"}
            assert (await _generate(engine, 99, "echo:2"))[0] == "2"
            with pytest.raises(ModelNotFoundError, match="serves echo:1, echo:2"):
                engine.get_model("echo", "3")
            # Promote to 2: both replicas of 1 leave, after the long stream is done.
            await engine.apply(deploy.promoted(canary), {}, revision=3)
            assert long.done()
            text = long.result()
            assert text.count("a") + text.count("b") == 30  # every token arrived
            assert {v for v, _ in [await _generate(engine, 100 + i) for i in range(5)]} == {"2"}
            assert not old_pids & _pids(engine)
            for pid in old_pids:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
            assert engine.num_in_flight() == 0
            # The model's state, not a replica's: the stopped replicas of 1 did not report it.
            assert states[-1] == ("echo", ModelState.READY)
            assert ("echo", ModelState.STOPPED) not in states
        finally:
            await engine.aclose()

    asyncio.run(main())


async def _long_stream(engine: LocalEngineClient) -> str:
    request = GenerateRequest("long", SamplingParams(max_tokens=30), prompt="a b")
    return "".join([d.text async for d in engine.generate("echo", request)])


def test_the_guard_sees_a_failing_canary(tmp_path: Path) -> None:
    v1, v2 = _version(tmp_path, "1"), _version(tmp_path, "2", fail_requests="1")

    async def main() -> None:
        engine = LocalEngineClient([v1], POLICY)
        await engine.start()
        try:
            assert await engine.wait_ready(30)
            canary = deploy.with_canary(deploy.single("echo", "1"), "2", 50)
            await engine.apply(canary, {"2": v2})
            errors = 0
            for i in range(40):
                try:
                    await _generate(engine, i)
                except Exception:
                    errors += 1
            assert errors == 20
            guard = CanaryGuard(GuardConfig(min_requests=10))
            ((name, version, reason),) = engine.canary_verdicts(guard)
            assert (name, version) == ("echo", "2") and "error rate 100.0%" in reason
            stable, trial = engine.outcomes("echo", "1"), engine.outcomes("echo", "2")
            assert stable is not None and (stable.requests, stable.errors) == (20, 0)
            assert trial is not None and (trial.requests, trial.errors) == (20, 20)
            await engine.apply(deploy.rolled_back(canary, None), {})
            assert engine.canary_verdicts(guard) == []
            assert engine.outcomes("echo", "2") is None
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_a_new_stable_version_that_cannot_load_changes_nothing(tmp_path: Path) -> None:
    v1, broken = _version(tmp_path, "1"), _version(tmp_path, "2", fail_load="no weights")

    async def main() -> None:
        engine = LocalEngineClient([v1], POLICY)
        await engine.start()
        try:
            assert await engine.wait_ready(30)
            pids = _pids(engine)
            await engine.apply(deploy.single("echo", "2"), {"2": broken}, revision=5)
            live = engine.describe("echo")
            assert "version 2 did not become ready (no weights)" in live["error"]
            assert engine.spec("echo").stable == "1" and _pids(engine) == pids
            assert (await _generate(engine, 1))[0] == "1"
            # An older revision arriving after a newer one was applied is ignored.
            await engine.apply(deploy.single("echo", "1", 2), {"1": v1}, revision=7)
            await engine.apply(deploy.single("echo", "1", 1), {"1": v1}, revision=6)
            assert engine.revision("echo") == 7 and len(_pids(engine)) == 2
            assert engine.describe("echo")["error"] is None
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_a_new_name_is_added_summed_over_replicas_and_removed_with_a_drain(
    tmp_path: Path,
) -> None:
    v1, late = _version(tmp_path, "1"), _version(tmp_path, "1", "late", token_delay_s="0.05")

    async def main() -> None:
        totals: dict[str, dict[str, int]] = {}
        versions: dict[str, Mapping[str, VersionStatus]] = {}
        engine = LocalEngineClient(
            [v1],
            POLICY,
            on_stats=lambda name, stats: totals.__setitem__(name, stats),
            on_versions=lambda name, status: versions.__setitem__(name, status),
        )
        await engine.start()
        try:
            assert await engine.wait_ready(30)
            await engine.apply(deploy.single("late", "1", 2), {"1": late}, revision=1)
            assert engine.names() == ["echo", "late"] and engine.is_ready()
            assert engine.get_model("late").state is ModelState.READY
            # Four streams in flight, two per replica: the name's counters add both up.
            streams = [asyncio.create_task(_stream(engine, "late", i)) for i in range(4)]
            deadline = time.monotonic() + 10
            while totals.get("late", {}).get("running") != 4:
                assert time.monotonic() < deadline, totals
                await asyncio.sleep(0.05)
            assert versions["late"]["1"].replicas == {"ready": 2}
            assert versions["late"]["1"].stats["running"] == 4
            # Removed while they run: new requests 404 at once, the streams finish.
            pids = {r["pid"] for v in engine.describe("late")["versions"] for r in v["replicas"]}
            removal = asyncio.create_task(engine.remove("late"))
            await asyncio.sleep(0.1)
            assert engine.names() == ["echo"] and versions["late"] == {}
            with pytest.raises(ModelNotFoundError):
                await _generate(engine, 1, "late")
            assert not removal.done() and engine.num_in_flight() == 4  # draining
            await removal
            assert all(t.done() for t in streams)
            assert [len(t.result()) for t in streams] == [30] * 4
            for pid in pids:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_a_new_name_that_cannot_load_is_not_served(tmp_path: Path) -> None:
    v1, broken = _version(tmp_path, "1"), _version(tmp_path, "1", "late", fail_load="no weights")

    async def main() -> None:
        engine = LocalEngineClient([v1], POLICY)
        await engine.start()
        try:
            assert await engine.wait_ready(30)
            await engine.apply(deploy.single("late", "1"), {"1": broken}, revision=1)
            assert engine.names() == ["echo"] and engine.is_ready()
            assert "no weights" in (engine.failed_to_add("late") or "")
        finally:
            await engine.aclose()

    asyncio.run(main())


async def _stream(engine: LocalEngineClient, model: str, i: int) -> list[str]:
    request = GenerateRequest(f"s{i}", SamplingParams(max_tokens=30), prompt="a b")
    return [d.text async for d in engine.generate(model, request)]
