"""The worker's pipeline for one-result requests: preprocess → dynamic batch → forward → post.

``preprocess`` and ``postprocess`` run on a small thread pool (tokenisers, image and audio
decoders release the GIL), ``forward`` on the worker's own thread, one batch at a time; the
:class:`~lmaas.engine.scheduling.DynamicBatcher` decides what goes into each batch. Everything
that leaves the worker is sent from the worker's thread (ZeroMQ sockets are not thread-safe):
helper threads hand their results back through queues and wake the loop through a pipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from lmaas.core.errors import InternalError, LmaasError, ModelLoadError, OverloadedError
from lmaas.core.messages import FromWorker, InferRequest, InferResult, RequestError, WorkerSpec
from lmaas.engine.scheduling import BatcherConfig, DynamicBatcher, QueuedRow
from lmaas.runtimes.base import BatchRunner, Prepared

_log = logging.getLogger("lmaas.worker")


def batcher_config(spec: WorkerSpec) -> BatcherConfig:
    """Batching limits from the spec (``max_batch_size``) and its serving options
    (``max_wait_ms``, ``max_batch_tokens``, ``max_queue_rows``).

    Raises:
        ModelLoadError: an option is not a number or out of range.
    """
    options = spec.options
    try:
        return BatcherConfig(
            max_batch_size=spec.max_batch_size,
            max_wait_s=float(options.get("max_wait_ms", "2")) / 1000.0,
            max_batch_tokens=int(options.get("max_batch_tokens", "16384")),
            max_queue_rows=int(options.get("max_queue_rows", "4096")),
        )
    except ValueError as exc:
        raise ModelLoadError(f"invalid batching options: {exc}") from exc


class BatchPipeline:
    """Owns the batcher and the helper threads for one :class:`BatchRunner`."""

    def __init__(
        self,
        runner: BatchRunner,
        config: BatcherConfig,
        send: Callable[[FromWorker], None],
        threads: int = 2,
    ) -> None:
        self._runner = runner
        self._send = send
        self._batcher: DynamicBatcher[Any] = DynamicBatcher(config)
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="lmaas-batch")
        self._preparing: dict[str, Future[Prepared]] = {}
        self._tenants: dict[str, tuple[str, float]] = {}
        """Tenant and weight of requests being prepared (fair share in the batcher)."""
        self._open: dict[str, tuple[Prepared, int]] = {}
        """Requests with rows queued or in a batch: (prepared, rows still missing)."""
        self._finishing: set[str] = set()
        """Requests in postprocess."""
        self._done: queue.SimpleQueue[tuple[str, Prepared | InferResult | LmaasError]] = (
            queue.SimpleQueue()
        )
        self._num_batches = 0
        self._num_rows = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def wake_fd(self) -> int:
        """Readable when a helper thread finished something: poll it beside the sockets."""
        return self._wake_r

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ the loop's calls

    def submit(self, request: InferRequest) -> None:
        limit = self._batcher.config.max_queue_rows
        if len(self._batcher) + len(self._preparing) >= limit:
            message = f"the batch queue is full ({limit} rows); retry later"
            self._send(RequestError(request.request_id, OverloadedError.code, message))
            return
        future = self._pool.submit(self._runner.preprocess, request)
        self._preparing[request.request_id] = future
        if request.tenant:
            self._tenants[request.request_id] = (request.tenant, request.tenant_weight)
        future.add_done_callback(partial(self._completed, "preprocessing", request.request_id))

    def abort(self, request_id: str) -> None:
        future = self._preparing.pop(request_id, None)
        self._tenants.pop(request_id, None)
        if future is not None:
            future.cancel()
        if self._open.pop(request_id, None) is not None:
            self._batcher.remove(request_id)

    def has_work(self) -> bool:
        return bool(self._preparing or self._open or self._finishing)

    def num_waiting(self) -> int:
        return len(self._batcher) + len(self._preparing)

    def stats(self) -> dict[str, int]:
        """Counters for heartbeats (``lmaas_engine_stat``): queue depth and batch sizes so far
        (rows / batches is the mean batch size)."""
        return {
            "waiting": self.num_waiting(),
            "queued_rows": len(self._batcher),
            "batches": self._num_batches,
            "batched_rows": self._num_rows,
        }

    def wait_s(self) -> float | None:
        """How long the loop may block before it must call :meth:`run_once` (None: no limit)."""
        return self._batcher.wait_s()

    def run_once(self) -> None:
        """Take in finished helper work, then run at most one forward batch."""
        self._drain_wake()
        self._collect()
        batch = self._batcher.next_batch()
        if batch:
            self._forward(batch)
            self._collect()

    # ------------------------------------------------------------------ internals

    def _completed(self, stage: str, request_id: str, future: Future[Any]) -> None:
        """A helper thread finished ``stage`` of a request: queue its outcome for the loop."""
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._done.put((request_id, future.result()))
        elif isinstance(error, LmaasError):
            self._done.put((request_id, error))
        else:
            _log.error("%s of %s failed", stage, request_id, exc_info=error)
            self._done.put((request_id, InternalError(f"{stage} failed")))
        self._wake()

    def _collect(self) -> None:
        while True:
            try:
                request_id, item = self._done.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Prepared):
                self._enqueue(request_id, item)
            elif isinstance(item, LmaasError):
                self._tenants.pop(request_id, None)
                if self._preparing.pop(request_id, None) is not None or (
                    request_id in self._finishing
                ):
                    self._finishing.discard(request_id)
                    self._send(RequestError(request_id, item.code, item.message, item.param))
            else:
                self._finishing.discard(request_id)
                self._send(item)

    def _enqueue(self, request_id: str, prepared: Prepared) -> None:
        if self._preparing.pop(request_id, None) is None:
            return  # aborted while it was being prepared
        if not prepared.rows:
            self._finish(prepared)
            return
        tenant, weight = self._tenants.pop(request_id, ("", 1.0))
        rows = [
            QueuedRow(request_id, index, length, payload, tenant=tenant, weight=weight)
            for index, (length, payload) in enumerate(prepared.rows)
        ]
        try:
            self._batcher.put(rows)
        except LmaasError as exc:
            self._send(RequestError(request_id, exc.code, exc.message, exc.param))
            return
        prepared.outputs = [None] * len(rows)
        self._open[request_id] = (prepared, len(rows))

    def _forward(self, batch: list[QueuedRow[Any]]) -> None:
        self._num_batches += 1
        self._num_rows += len(batch)
        try:
            outputs = self._runner.forward([row.payload for row in batch])
            if len(outputs) != len(batch):
                raise InternalError(f"forward returned {len(outputs)} outputs for {len(batch)}")
        except Exception as exc:
            error = exc if isinstance(exc, LmaasError) else InternalError("the model call failed")
            if not isinstance(exc, LmaasError):
                _log.exception("forward of a batch of %d rows failed", len(batch))
            for request_id in dict.fromkeys(row.request_id for row in batch):
                if self._open.pop(request_id, None) is not None:
                    self._batcher.remove(request_id)
                    self._send(RequestError(request_id, error.code, error.message, error.param))
            return
        for row, output in zip(batch, outputs, strict=True):
            entry = self._open.get(row.request_id)
            if entry is None:
                continue  # aborted, or failed with an earlier batch
            prepared, missing = entry
            prepared.outputs[row.index] = output
            if missing > 1:
                self._open[row.request_id] = (prepared, missing - 1)
            else:
                del self._open[row.request_id]
                self._finish(prepared)

    def _finish(self, prepared: Prepared) -> None:
        self._finishing.add(prepared.request_id)
        future = self._pool.submit(self._runner.postprocess, prepared)
        future.add_done_callback(partial(self._completed, "postprocessing", prepared.request_id))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass
