"""LocalEngineClient: the EngineClient over worker processes on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from lmaas.core.errors import DrainingError, InternalError, ModelNotFoundError
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    SeqDelta,
    WorkerSpec,
)
from lmaas.core.types import ModelState, Task
from lmaas.engine.protocol import ServedModel, model_not_served
from lmaas.engine.worker_handle import (
    StateListener,
    StatsListener,
    SupervisionPolicy,
    WorkerHandle,
)


@dataclass(slots=True, frozen=True)
class Deployment:
    """One model version to serve: its worker spec plus what the API lists about it."""

    spec: WorkerSpec
    task: Task
    created_at: float


class LocalEngineClient:
    """Runs one supervised worker process per deployed model version.

    Args:
        deployments: What to serve; model names must be unique.
        policy: Worker start/restart policy and admission limit.
        on_state: Called on every worker state transition (metrics).
        on_stats: Called with the engine counters of every worker heartbeat (metrics).
    """

    def __init__(
        self,
        deployments: Iterable[Deployment],
        policy: SupervisionPolicy,
        on_state: StateListener | None = None,
        on_stats: StatsListener | None = None,
    ) -> None:
        # ipc socket paths must stay under ~100 bytes, so they live in a short temp dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="lmaas-"))
        self._deployments: dict[str, Deployment] = {}
        self._handles: dict[str, WorkerHandle] = {}
        for deployment in deployments:
            name = deployment.spec.model_name
            if name in self._deployments:
                raise ValueError(f"model {name} is deployed twice")
            self._deployments[name] = deployment
            self._handles[name] = WorkerHandle(
                deployment.spec, self._run_dir, policy, on_state, on_stats
            )
        self._draining = False

    async def start(self) -> None:
        for handle in self._handles.values():
            await handle.start()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait for every model to be READY or FAILED; True when all are READY."""
        results = await asyncio.gather(*(h.wait_ready(timeout_s) for h in self._handles.values()))
        return all(results)

    def begin_draining(self) -> None:
        """Refuse new requests (503) while the in-flight ones finish."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    async def aclose(self) -> None:
        await asyncio.gather(*(h.aclose() for h in self._handles.values()))
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def num_in_flight(self) -> int:
        return sum(h.num_in_flight for h in self._handles.values())

    def handle(self, name: str) -> WorkerHandle:
        """The supervised worker of a model (for operations and tests)."""
        try:
            return self._handles[name]
        except KeyError:
            raise model_not_served(name) from None

    # ------------------------------------------------------------------ EngineClient

    def list_models(self) -> list[ServedModel]:
        return [self._describe(name) for name in sorted(self._handles)]

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        served = self._describe(self.handle(name).name)
        if version is not None and version != served.version:
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not served (serving {served.version})",
                param="model",
            )
        return served

    def is_ready(self) -> bool:
        if self._draining:
            return False
        return all(h.state is ModelState.READY for h in self._handles.values())

    async def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        handle = self._route(model)
        # aclosing: closing this stream must close the handle's at once, which aborts the request.
        async with contextlib.aclosing(handle.generate(request)) as stream:
            async for delta in stream:
                yield delta

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        result = await self.infer(model, request)
        if not isinstance(result, EmbedResult):
            raise InternalError("the worker answered an embedding request with another result")
        return result

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        return await self._route(model).infer(request)

    def _route(self, model: str) -> WorkerHandle:
        handle = self.handle(model)
        if self._draining:
            raise DrainingError("the server is shutting down; retry elsewhere", retry_after_s=5.0)
        return handle

    def _describe(self, name: str) -> ServedModel:
        handle, deployment = self._handles[name], self._deployments[name]
        return ServedModel(
            name=name,
            version=deployment.spec.model_version,
            task=deployment.task,
            state=handle.state,
            created_at=deployment.created_at,
            info=handle.info,
            error=handle.error if handle.state is ModelState.FAILED else None,
        )
