"""The deployment controller tries a change it could not apply again, with exponential
backoff, until it loads or a new change or a stop replaces it (fakes: no worker, no DB)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from lmaas.bootstrap.deployments import DeploymentController
from lmaas.bootstrap.load_retry import retry_delay
from lmaas.bootstrap.settings import Settings
from lmaas.engine import deploy
from lmaas.engine.deploy import DeploymentSpec
from lmaas.engine.local import Deployment, LocalEngineClient
from lmaas.lifecycle.deployments import DeploymentService, describe_retry, fleet_status
from lmaas.registry.deployments_db import FLEET_GATEWAY_ROW, FleetRow, StoredDeployment


def test_the_delay_doubles_from_the_initial_one_up_to_the_maximum() -> None:
    assert [retry_delay(n, 5, 300) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert retry_delay(10_000, 5, 300) == 300  # no overflow


class FakeEngine:
    """Loads a name's stable version only once ``loads_after`` tries have failed."""

    def __init__(self, loads_after: int) -> None:
        self.loads_after = loads_after
        self.tries: list[int] = []
        self.served: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.served)

    def revision(self, name: str) -> int:
        return self.served[name]

    def failed_to_add(self, name: str) -> str | None:
        return self.errors.get(name)

    def describe(self, name: str) -> dict[str, Any]:
        return {"revision": self.served[name], "versions": [], "draining_replicas": 0}

    async def apply(
        self, spec: DeploymentSpec, versions: Mapping[str, Deployment], *, revision: int
    ) -> None:
        self.tries.append(revision)
        if len(self.tries) <= self.loads_after:
            self.errors[spec.name] = f"revision {revision}: version {spec.stable} did not load"
            return
        self.errors.pop(spec.name, None)
        self.served[spec.name] = revision

    async def remove(self, name: str) -> None:
        self.served.pop(name, None)
        self.errors.pop(name, None)


class FakeStore:
    def __init__(self) -> None:
        self.stored: dict[str, StoredDeployment] = {}
        self.fleet: dict[str, dict[str, Any]] = {}

    def put(self, name: str, version: str, revision: int) -> None:
        spec = deploy.single(name, version).to_dict()
        self.stored[name] = StoredDeployment(name, spec, revision, datetime.now(UTC), "test")

    def revisions(self) -> dict[str, int]:
        return {n: s.revision for n, s in self.stored.items()}

    def get(self, name: str) -> StoredDeployment | None:
        return self.stored.get(name)

    def publish_fleet(self, gateway: str, reports: dict[str, dict[str, Any]]) -> None:
        self.fleet = reports


def _controller(
    tmp_path: Path, engine: FakeEngine, store: FakeStore, *, retry_initial_s: float = 0.1
) -> tuple[DeploymentController, SimpleNamespace]:
    """A controller over the fakes; ``retry_initial_s`` 0 turns load retries off."""
    settings = Settings(
        home=tmp_path,
        deploy={
            "poll_interval_s": 0.02,
            "auto_rollback": False,
            "load_retry_initial_s": retry_initial_s,
            "load_retry_max_s": 0.4,
        },
    )
    service = SimpleNamespace(registry=SimpleNamespace(deployments=store), on_change=None)
    controller = DeploymentController(
        cast(LocalEngineClient, engine),
        cast(DeploymentService, service),
        lambda name, version: cast(Deployment, None),
        settings,
        revisions={},
    )
    return controller, service


async def _until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_failed_load_is_retried_with_backoff_and_shows_in_live_and_fleet(
    tmp_path: Path,
) -> None:
    engine, store = FakeEngine(loads_after=3), FakeStore()
    controller, service = _controller(tmp_path, engine, store)

    async def main() -> None:
        store.put("late", "1", 1)
        await controller.start()
        try:
            await _until(lambda: len(engine.tries) == 2)
            live = service.live("late")
            assert "did not load" in live["error"]
            retry = live["retry"]
            assert retry["revision"] == 1 and retry["attempts"] in (1, 2)
            assert 0 <= retry["next_retry_in_s"] <= 0.4
            await _until(lambda: (store.fleet.get("late") or {}).get("retry", {}))
            report = store.fleet["late"]
            assert report["failed_revision"] == 1 and report["retry"]["revision"] == 1
            rows = [
                FleetRow("g", FLEET_GATEWAY_ROW, {"follows": None}, datetime.now(UTC)),
                FleetRow("g", "late", report, datetime.now(UTC)),
            ]
            status = fleet_status("late", 1, False, rows)
            assert status.gateways[0].retry == report["retry"]
            assert "time(s), next try at" in status.gateways[0].describe()
            # The 4th try loads: served, the retry is forgotten.
            started = asyncio.get_running_loop().time()
            await _until(lambda: "late" in engine.served)
            # waits of 0.1, 0.2, 0.4 (capped) between the 4 tries
            assert engine.tries == [1, 1, 1, 1]
            assert asyncio.get_running_loop().time() - started < 2.0
            assert service.live("late")["retry"] is None
            await _until(lambda: store.fleet["late"]["retry"] is None)
        finally:
            await controller.aclose()

    asyncio.run(main())


def test_a_new_change_or_a_stop_replaces_the_retry(tmp_path: Path) -> None:
    engine, store = FakeEngine(loads_after=1_000), FakeStore()
    controller, service = _controller(tmp_path, engine, store)

    async def main() -> None:
        store.put("late", "1", 1)
        await controller.start()
        try:
            await _until(lambda: len(engine.tries) >= 3)  # backoff is now 0.4 s
            store.put("late", "2", 2)
            await _until(lambda: 2 in engine.tries)
            await _until(lambda: service.live("late")["retry"]["revision"] == 2)
            assert service.live("late")["retry"]["attempts"] == 1  # counted afresh
            del store.stored["late"]
            await _until(lambda: service.live("late") is None)
            tries = len(engine.tries)
            await asyncio.sleep(0.5)
            assert len(engine.tries) == tries  # stopped: no more tries
            assert "late" not in store.fleet
        finally:
            await controller.aclose()

    asyncio.run(main())


def test_describe_retry_reads_the_fleet_row() -> None:
    retry = {"attempts": 2, "next_retry_at": "2026-11-27T23:41:07+00:00"}
    assert describe_retry(retry) == " (failed 2 time(s), next try at 23:41:07 UTC)"
    assert describe_retry(None) == ""


def test_no_retry_when_turned_off(tmp_path: Path) -> None:
    engine, store = FakeEngine(loads_after=1_000), FakeStore()
    controller, service = _controller(tmp_path, engine, store, retry_initial_s=0.0)

    async def main() -> None:
        store.put("late", "1", 1)
        await controller.start()
        try:
            await _until(lambda: len(engine.tries) == 1)
            await asyncio.sleep(0.3)
            assert engine.tries == [1] and service.live("late")["retry"] is None
        finally:
            await controller.aclose()

    asyncio.run(main())
