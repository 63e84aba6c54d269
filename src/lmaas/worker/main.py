"""Worker process main: loads one model version and serves it over ZeroMQ.

Started by the gateway's supervisor as ``python -m lmaas.worker SPEC_FILE``. The loop:
read every pending request, run one engine step (or one dynamic batch of a one-result task, see
``batching.py``), send the results back in one message per step, repeat. It reports
``WorkerReady`` once loaded, ``WorkerFailed`` if loading fails, and a ``Heartbeat`` every
interval; it exits when told to, or when its parent dies.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import msgspec
import zmq

from lmaas.core.errors import LmaasError, ModelLoadError
from lmaas.core.hashing import verify_file
from lmaas.core.messages import (
    AbortRequest,
    ClassifyRequest,
    EmbedRequest,
    FromWorker,
    GenerateRequest,
    Heartbeat,
    RequestError,
    RerankRequest,
    Shutdown,
    StepOutput,
    TensorRequest,
    ToWorker,
    TranscribeRequest,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
)
from lmaas.runtimes.base import BatchRunner, GenerationRunner, Runner
from lmaas.worker.batching import BatchPipeline, batcher_config
from lmaas.worker.factory import create_runner

_log = logging.getLogger("lmaas.worker")
_HEARTBEAT_S = 1.0
_INFER_TYPES = (EmbedRequest, RerankRequest, ClassifyRequest, TranscribeRequest, TensorRequest)
_TASK_WORDS = {
    EmbedRequest: "embed text",
    RerankRequest: "rerank documents",
    ClassifyRequest: "classify inputs",
    TranscribeRequest: "transcribe audio",
    TensorRequest: "run tensor inference",
}


def verify_files(spec: WorkerSpec) -> None:
    """Re-hash every artifact. Raises: ChecksumMismatchError naming the file and both digests."""
    root = Path(spec.model_dir)
    label = f"{spec.model_name}:{spec.model_version}"
    for entry in spec.files:
        verify_file(root / entry.path, entry, label)


class WorkerLoop:
    """Owns the sockets and the runner; one instance per process."""

    def __init__(self, spec: WorkerSpec, runner: Runner, context: zmq.Context[zmq.Socket[bytes]]):
        self._spec = spec
        self._requests = context.socket(zmq.PULL)
        self._requests.connect(spec.requests_endpoint)
        self._results = context.socket(zmq.PUSH)
        self._results.setsockopt(zmq.LINGER, 2000)
        self._results.connect(spec.results_endpoint)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToWorker)
        self._parent_pid = os.getppid()
        self._stop = False
        # Decided once: the loop checks these on every iteration.
        self._gen = runner if isinstance(runner, GenerationRunner) else None
        self._batch: BatchPipeline | None = None
        self._accepts: tuple[type, ...] = ()
        if isinstance(runner, BatchRunner):
            self._batch = BatchPipeline(runner, batcher_config(spec), self.send)
            self._accepts = runner.accepts()
        self._poller = zmq.Poller()
        self._poller.register(self._requests, zmq.POLLIN)
        if self._batch is not None:
            self._poller.register(self._batch.wake_fd, zmq.POLLIN)

    def send(self, message: FromWorker) -> None:
        self._results.send(self._encoder.encode(message))

    def run(self) -> None:
        next_heartbeat = 0.0
        while not self._stop:
            self._receive(timeout_ms=self._poll_timeout_ms())
            self._run_once()
            now = time.monotonic()
            if now >= next_heartbeat:
                if os.getppid() != self._parent_pid:
                    _log.warning("parent process is gone; worker exits")
                    return
                self.send(self._heartbeat())
                next_heartbeat = now + _HEARTBEAT_S

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
        self._requests.close(linger=0)
        self._results.close()

    def _poll_timeout_ms(self) -> int:
        if self._gen is not None and self._gen.has_work():
            return 0
        if self._batch is not None:
            wait = self._batch.wait_s()
            if wait is not None:
                return min(int(_HEARTBEAT_S * 1000), int(wait * 1000 + 0.999))
        return int(_HEARTBEAT_S * 1000)

    def _heartbeat(self) -> Heartbeat:
        if self._gen is None:
            if self._batch is None:
                return Heartbeat(num_running=0, num_waiting=0)
            stats = self._batch.stats()
            return Heartbeat(num_running=0, num_waiting=stats["waiting"], stats=stats)
        stats = self._gen.stats()
        return Heartbeat(
            num_running=self._gen.num_running(), num_waiting=stats.get("waiting", 0), stats=stats
        )

    def _receive(self, timeout_ms: int) -> None:
        if not self._poller.poll(timeout_ms):
            return
        while True:
            try:
                raw = self._requests.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(self._decoder.decode(raw))

    def _dispatch(self, message: ToWorker) -> None:
        if isinstance(message, GenerateRequest):
            self._add_generate(message)
        elif isinstance(message, _INFER_TYPES):
            if self._batch is not None and isinstance(message, self._accepts):
                self._batch.submit(message)
            else:
                words = _TASK_WORDS[type(message)]
                self.send(_refusal(message.request_id, f"this model does not {words}"))
        elif isinstance(message, AbortRequest):
            if self._gen is not None:
                self._gen.abort(message.request_id)
            if self._batch is not None:
                self._batch.abort(message.request_id)
        elif isinstance(message, Shutdown):
            self._stop = True

    def _add_generate(self, request: GenerateRequest) -> None:
        if self._gen is None:
            self.send(_refusal(request.request_id, "this model does not generate text"))
            return
        try:
            self._gen.add_request(request)
        except LmaasError as exc:
            self.send(RequestError(request.request_id, exc.code, exc.message, exc.param))

    def _run_once(self) -> None:
        if self._batch is not None:
            self._batch.run_once()
        if self._gen is not None and self._gen.has_work():
            deltas = self._gen.step()
            if deltas:
                self.send(StepOutput(deltas=deltas))


def _refusal(request_id: str, message: str) -> RequestError:
    return RequestError(request_id, "invalid_request", message, "model")


def _load(spec: WorkerSpec) -> Runner:
    if spec.verify_checksums:
        verify_files(spec)
    return create_runner(spec)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"
    )
    spec = msgspec.json.decode(Path(args[0]).read_bytes(), type=WorkerSpec)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 2000)
    results.connect(spec.results_endpoint)
    encoder = msgspec.msgpack.Encoder()
    try:
        runner = _load(spec)
        if isinstance(runner, BatchRunner):
            batcher_config(spec)  # refuse bad batching options before loading anything
        info = runner.load()
        runner.warmup()
    except LmaasError as exc:
        # Loading is deterministic: the same files fail the same way, so no retry.
        results.send(encoder.encode(WorkerFailed(exc.code, exc.message, retryable=False)))
        results.close()
        return 3
    except Exception as exc:
        _log.exception("loading %s failed", spec.model_name)
        failed = WorkerFailed(ModelLoadError.code, f"{type(exc).__name__}: {exc}", False)
        results.send(encoder.encode(failed))
        results.close()
        return 3
    results.close()
    loop = WorkerLoop(spec, runner, context)
    loop.send(WorkerReady(pid=os.getpid(), info=info))
    _log.info("serving %s:%s (%s)", spec.model_name, spec.model_version, info.device)
    try:
        loop.run()
    finally:
        loop.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
