"""One supervised worker process on this machine, seen from the gateway.

A :class:`WorkerHandle` starts ``python -m lmaas.worker``, talks to it over two ZeroMQ
ipc sockets (a fresh pair per incarnation, so nothing queued for a dead process reaches the next
one), routes its results to the waiting requests, and restarts it with exponential backoff when
it dies. A crash fails exactly the requests in flight (``WorkerCrashedError``, retryable); a model
that cannot load (bad checksum, unsupported weights) stays FAILED with the worker's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from lmaas.core.errors import (
    InternalError,
    LmaasError,
    ModelNotReadyError,
    OverloadedError,
    WorkerCrashedError,
    error_from_code,
)
from lmaas.core.messages import (
    AbortRequest,
    ClassifyResult,
    EmbedResult,
    FromWorker,
    GenerateRequest,
    Heartbeat,
    InferRequest,
    InferResult,
    ModelInfo,
    RequestError,
    ScoreResult,
    SeqDelta,
    Shutdown,
    StepOutput,
    TensorResult,
    ToWorker,
    TranscriptionResult,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
)
from lmaas.core.types import ModelState

_log = logging.getLogger("lmaas.engine")

StateListener = Callable[[str, ModelState], None]
StatsListener = Callable[[str, dict[str, int]], None]


@dataclass(slots=True, frozen=True)
class SupervisionPolicy:
    """How a worker is started and restarted (copied from ``EngineConfig``)."""

    start_timeout_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_restarts: int = 10
    max_in_flight: int = 256
    stop_timeout_s: float = 10.0


PASSIVE_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Set in the environment of a worker of a one-result task (embeddings, rerank, classification,
speech, vision, seq2seq, tensors) unless the operator's environment sets it.

The OpenMP threads of torch then sleep when a parallel region ends instead of spinning for the
next one. Such a worker runs a forward pass per dynamic batch and tokenises / post-processes on
helper threads, beside the gateway on the same cores: spinning threads take those cores while
waiting, and when the cores are oversubscribed a parallel region waits for a descheduled
thread. Measured on the 2-core development machines (``benchmarks/embeddings_compare.py``,
torch backend, ``docs/benchmarks.md``): under load 8 sentences/s spinning, 51 passive; quiet,
76-87 by default, 94-103 passive. LLM workers keep OpenMP's default: their step loop runs
parallel regions back to back, and passive waiting cost 8% of batch throughput and 11% of
single-stream decode speed there (``compare_llm.py``, 2026-11-28). onnxruntime sessions never
spin (``session.intra_op.allow_spinning=0``)."""

_SPINNING_TASKS = frozenset({"chat", "completion"})


def worker_environment(task: str) -> dict[str, str]:
    """The environment a worker process of ``task`` starts with: the gateway's, plus
    :data:`PASSIVE_OPENMP` for one-result tasks where the gateway's does not say otherwise."""
    if task in _SPINNING_TASKS:
        return dict(os.environ)
    return {**PASSIVE_OPENMP, **os.environ}


@dataclass(slots=True)
class _Incarnation:
    process: asyncio.subprocess.Process
    requests: zmq.asyncio.Socket
    results: zmq.asyncio.Socket
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


_Item = SeqDelta | InferResult | LmaasError
_RESULT_TYPES = (EmbedResult, ScoreResult, ClassifyResult, TranscriptionResult, TensorResult)


class WorkerHandle:
    """Supervises the worker of one model version.

    Args:
        spec: The worker spec; its endpoints are replaced per incarnation.
        run_dir: A short directory for the ipc socket files.
        policy: Timeouts, backoff and admission limits.
        on_state: Called with (model name, new state) on every transition.
        on_stats: Called with (model name, engine counters) on every heartbeat.
        instance: Names this worker's socket files; unique per handle when a version runs
            several replicas (default: the model name).
    """

    def __init__(
        self,
        spec: WorkerSpec,
        run_dir: Path,
        policy: SupervisionPolicy,
        on_state: StateListener | None = None,
        on_stats: StatsListener | None = None,
        instance: str | None = None,
    ) -> None:
        self.spec = spec
        self.instance = instance or spec.model_name
        self.state = ModelState.STOPPED
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self.num_restarts = 0
        self.worker_num_running = 0
        self.worker_stats: dict[str, int] = {}
        """The engine counters of the last heartbeat."""
        """Sequences the worker reported running in its last heartbeat."""
        self._run_dir = run_dir
        self._policy = policy
        self._on_state = on_state
        self._on_stats = on_stats
        self._context = zmq.asyncio.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromWorker)
        self._channels: dict[str, asyncio.Queue[_Item]] = {}
        self._incarnation: _Incarnation | None = None
        self._generation = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start supervising; returns at once (the model loads in the background)."""
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until READY or FAILED; True when READY."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        return self.state is ModelState.READY

    async def aclose(self) -> None:
        """Stop the worker: ask it to exit, then terminate, then kill."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._stop_incarnation(graceful=True)
        self._set_state(ModelState.STOPPED)
        self._context.term()

    @property
    def name(self) -> str:
        return self.spec.model_name

    @property
    def worker_pid(self) -> int | None:
        incarnation = self._incarnation
        return incarnation.process.pid if incarnation is not None else None

    @property
    def num_in_flight(self) -> int:
        return len(self._channels)

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[SeqDelta, None]:
        """Stream the deltas of one request; closing early aborts it in the worker."""
        queue = self._admit(request.request_id)
        finished = False
        # With n > 1 every choice ends with its own finish_reason.
        num_open = max(1, request.sampling.n)
        try:
            await self._send(request)
            while True:
                item = await queue.get()
                if isinstance(item, LmaasError):
                    finished = True
                    raise item
                if not isinstance(item, SeqDelta):
                    raise InternalError("worker answered a generation with a non-text result")
                if item.finish_reason is not None:
                    num_open -= 1
                    finished = num_open == 0
                yield item
                if finished:
                    return
        finally:
            self._channels.pop(request.request_id, None)
            if not finished:
                await self._send_quietly(AbortRequest(request.request_id))

    async def infer(self, request: InferRequest) -> InferResult:
        """Send a one-result request (embed, rerank, classify, transcribe, tensor); await it."""
        queue = self._admit(request.request_id)
        try:
            await self._send(request)
            item = await queue.get()
        except asyncio.CancelledError:
            await self._send_quietly(AbortRequest(request.request_id))
            raise
        finally:
            self._channels.pop(request.request_id, None)
        if isinstance(item, LmaasError):
            raise item
        if isinstance(item, SeqDelta):
            raise InternalError("worker answered a one-result request with generated text")
        return item

    def _admit(self, request_id: str) -> asyncio.Queue[_Item]:
        if self.state is not ModelState.READY or self._incarnation is None:
            raise ModelNotReadyError(
                f"model {self.name} is not ready (state: {self.state.value})", retry_after_s=2.0
            )
        if len(self._channels) >= self._policy.max_in_flight:
            raise OverloadedError(
                f"model {self.name} has {len(self._channels)} requests in flight; retry later",
                retry_after_s=1.0,
            )
        if request_id in self._channels:
            raise InternalError(f"duplicate request id {request_id}")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._channels[request_id] = queue
        return queue

    async def _send(self, message: ToWorker) -> None:
        incarnation = self._incarnation
        if incarnation is None:
            raise ModelNotReadyError(f"model {self.name} is not ready", retry_after_s=2.0)
        await incarnation.requests.send(self._encoder.encode(message))

    async def _send_quietly(self, message: ToWorker) -> None:
        incarnation = self._incarnation
        if incarnation is not None:
            with contextlib.suppress(zmq.ZMQError):
                await incarnation.requests.send(self._encoder.encode(message), zmq.NOBLOCK)

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        crashes_in_a_row = 0
        while not self._stopping:
            started = time.monotonic()
            exit_code, retry = await self._run_incarnation()
            if self._stopping:
                return
            self._fail_in_flight(
                WorkerCrashedError(
                    f"the worker of model {self.name} exited (code {exit_code}); retry",
                    retry_after_s=2.0,
                )
            )
            if not retry:
                return
            # A worker that ran for a while before dying starts a fresh backoff series.
            stable = time.monotonic() - started > 60.0
            crashes_in_a_row = 1 if stable else crashes_in_a_row + 1
            if crashes_in_a_row > self._policy.max_restarts:
                self.error = f"worker crashed {crashes_in_a_row} times in a row; giving up"
                self._set_state(ModelState.FAILED)
                return
            delay = min(
                self._policy.backoff_max_s,
                self._policy.backoff_initial_s * 2 ** (crashes_in_a_row - 1),
            )
            self.num_restarts += 1
            self._set_state(ModelState.RESTARTING)
            _log.warning("restarting worker of %s in %.1fs", self.name, delay)
            await asyncio.sleep(delay)

    async def _run_incarnation(self) -> tuple[int | None, bool]:
        """Run one worker process to its end. Returns (exit code, whether to restart)."""
        self._generation += 1
        self._ready_event.clear()
        self._set_state(ModelState.LOADING)
        incarnation = await self._spawn()
        self._incarnation = incarnation
        reader = asyncio.create_task(self._read_results(incarnation))
        incarnation.tasks.append(reader)
        load_timer = asyncio.create_task(self._enforce_start_timeout(incarnation))
        incarnation.tasks.append(load_timer)
        exit_code = await incarnation.process.wait()
        await asyncio.sleep(0.05)  # let the reader drain what the worker sent last
        await self._stop_incarnation(graceful=False)
        if self.state is ModelState.FAILED:
            return exit_code, False
        if not self._stopping:
            _log.error("worker of %s exited with code %s", self.name, exit_code)
        return exit_code, True

    async def _spawn(self) -> _Incarnation:
        base = self._run_dir / f"{self.instance}-{self._generation}"
        requests = self._context.socket(zmq.PUSH)
        requests.setsockopt(zmq.LINGER, 0)
        requests.bind(f"ipc://{base}.in")
        results = self._context.socket(zmq.PULL)
        results.setsockopt(zmq.LINGER, 0)
        results.bind(f"ipc://{base}.out")
        spec = msgspec.structs.replace(
            self.spec, requests_endpoint=f"ipc://{base}.in", results_endpoint=f"ipc://{base}.out"
        )
        spec_file = Path(f"{base}.spec.json")
        spec_file.write_bytes(msgspec.json.encode(spec))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lmaas.worker",
            str(spec_file),
            stdin=asyncio.subprocess.DEVNULL,
            env=worker_environment(self.spec.task),
        )
        _log.info("started worker pid %s for %s", process.pid, self.name)
        return _Incarnation(process=process, requests=requests, results=results)

    async def _enforce_start_timeout(self, incarnation: _Incarnation) -> None:
        await asyncio.sleep(self._policy.start_timeout_s)
        if self.state is ModelState.LOADING and incarnation.process.returncode is None:
            self.error = f"model did not load within {self._policy.start_timeout_s:.0f}s"
            self._set_state(ModelState.FAILED)
            incarnation.process.kill()

    async def _read_results(self, incarnation: _Incarnation) -> None:
        while True:
            raw = await incarnation.results.recv()
            try:
                message = self._decoder.decode(raw)
            except msgspec.DecodeError:
                _log.exception("undecodable message from the worker of %s", self.name)
                continue
            self._on_message(message)

    def _on_message(self, message: FromWorker) -> None:
        if isinstance(message, StepOutput):
            for delta in message.deltas:
                self._deliver(delta.request_id, delta)
        elif isinstance(message, _RESULT_TYPES):
            self._deliver(message.request_id, message)
        elif isinstance(message, RequestError):
            error = error_from_code(message.code, message.message, message.param)
            self._deliver(message.request_id, error)
        elif isinstance(message, WorkerReady):
            self.info = message.info
            self.error = None
            self._set_state(ModelState.READY)
        elif isinstance(message, WorkerFailed):
            self.error = message.message
            _log.error("model %s failed to load: %s", self.name, message.message)
            if not message.retryable:
                self._set_state(ModelState.FAILED)
        elif isinstance(message, Heartbeat):
            self.worker_num_running = message.num_running
            self.worker_stats = message.stats
            if self._on_stats is not None:
                self._on_stats(self.name, message.stats)

    def _deliver(self, request_id: str, item: _Item) -> None:
        queue = self._channels.get(request_id)
        if queue is not None:  # else: aborted meanwhile
            queue.put_nowait(item)

    def _fail_in_flight(self, error: LmaasError) -> None:
        for queue in self._channels.values():
            queue.put_nowait(error)

    async def _stop_incarnation(self, *, graceful: bool) -> None:
        incarnation, self._incarnation = self._incarnation, None
        if incarnation is None:
            return
        process = incarnation.process
        if process.returncode is None:
            if graceful:
                with contextlib.suppress(zmq.ZMQError):
                    await incarnation.requests.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            await self._wait_or_kill(process)
        for task in incarnation.tasks:
            task.cancel()
        for task in incarnation.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        incarnation.requests.close()
        incarnation.results.close()

    async def _wait_or_kill(self, process: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(process.wait(), self._policy.stop_timeout_s / 2)
        except TimeoutError:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self._policy.stop_timeout_s / 2)
            except TimeoutError:
                process.kill()
                await process.wait()

    def _set_state(self, state: ModelState) -> None:
        if state is self.state:
            return
        self.state = state
        if state in (ModelState.READY, ModelState.FAILED):
            self._ready_event.set()
        if self._on_state is not None:
            self._on_state(self.name, state)
