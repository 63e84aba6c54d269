"""The worker's batch pipeline with a fake runner: batching across requests, errors, aborts."""

from __future__ import annotations

import threading
import time
from typing import Any

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    FromWorker,
    InferRequest,
    ModelInfo,
    RequestError,
)
from lmaas.engine.scheduling import BatcherConfig
from lmaas.runtimes.base import BatchRunner, Prepared
from lmaas.worker.batching import BatchPipeline


class CountingRunner:
    """Each text is a row; forward returns its length; 'boom' fails the forward."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def load(self) -> ModelInfo:
        return ModelInfo(context_length=8, dtype="float32", device="cpu")

    def warmup(self) -> None:
        pass

    def health(self) -> bool:
        return True

    def accepts(self) -> tuple[type, ...]:
        return (EmbedRequest,)

    def preprocess(self, request: InferRequest) -> Prepared:
        assert isinstance(request, EmbedRequest)
        self.threads.add(threading.current_thread().name)
        if not request.texts:
            raise InvalidRequestError("input is empty", param="input")
        return Prepared(request.request_id, [(len(t), t) for t in request.texts])

    def forward(self, payloads: list[Any]) -> list[Any]:
        self.batches.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("kaboom")
        return [len(p) for p in payloads]

    def postprocess(self, prepared: Prepared) -> EmbedResult:
        data = bytes(prepared.outputs)
        return EmbedResult(prepared.request_id, data, len(data), 1, sum(prepared.outputs))


def drive(pipeline: BatchPipeline, sent: list[FromWorker], count: int) -> None:
    deadline = time.monotonic() + 5
    while len(sent) < count:
        assert time.monotonic() < deadline, sent
        pipeline.run_once()
        time.sleep(0.001)


def make(**kw: Any) -> tuple[BatchPipeline, CountingRunner, list[FromWorker]]:
    runner = CountingRunner()
    assert isinstance(runner, BatchRunner)
    sent: list[FromWorker] = []
    config = BatcherConfig(**{"max_batch_size": 8, "max_wait_s": 0.005, **kw})
    return BatchPipeline(runner, config, sent.append), runner, sent


def test_rows_of_many_requests_share_a_forward() -> None:
    pipeline, runner, sent = make()
    for i in range(4):
        pipeline.submit(EmbedRequest(f"r{i}", texts=["ab", "abc"]))
    drive(pipeline, sent, 4)
    assert len(runner.batches) == 1 and len(runner.batches[0]) == 8
    results = {r.request_id: r for r in sent if isinstance(r, EmbedResult)}
    assert results["r2"].data == bytes([2, 3]) and results["r2"].prompt_tokens == 5
    assert all(name.startswith("lmaas-batch") for name in runner.threads)
    assert not pipeline.has_work()
    assert pipeline.stats() == {"waiting": 0, "queued_rows": 0, "batches": 1, "batched_rows": 8}
    pipeline.close()


def test_a_bad_request_fails_alone() -> None:
    pipeline, _, sent = make()
    pipeline.submit(EmbedRequest("bad", texts=[]))
    pipeline.submit(EmbedRequest("good", texts=["x"]))
    drive(pipeline, sent, 2)
    by_id = {r.request_id: r for r in sent if isinstance(r, RequestError | EmbedResult)}
    assert isinstance(by_id["bad"], RequestError) and by_id["bad"].param == "input"
    assert isinstance(by_id["good"], EmbedResult)
    pipeline.close()


def test_a_failed_forward_fails_its_batch_and_the_pipeline_goes_on() -> None:
    pipeline, _, sent = make(max_batch_size=2)
    pipeline.submit(EmbedRequest("a", texts=["boom", "okay"]))
    drive(pipeline, sent, 1)
    assert isinstance(sent[0], RequestError) and sent[0].code == "internal_error"
    pipeline.submit(EmbedRequest("b", texts=["fine"]))
    drive(pipeline, sent, 2)
    assert isinstance(sent[1], EmbedResult)
    pipeline.close()


def test_abort_drops_queued_rows() -> None:
    pipeline, runner, sent = make(max_wait_s=10.0)
    pipeline.submit(EmbedRequest("a", texts=["x", "y"]))
    deadline = time.monotonic() + 5
    while pipeline.num_waiting() and not len(pipeline._batcher):
        assert time.monotonic() < deadline
        pipeline.run_once()
        time.sleep(0.001)
    pipeline.abort("a")
    pipeline.submit(EmbedRequest("b", texts=["z"] * 8))  # a full batch runs at once
    drive(pipeline, sent, 1)
    assert [r.request_id for r in sent] == ["b"]
    assert runner.batches == [["z"] * 8]
    pipeline.close()


def test_overflow_is_refused_before_any_work() -> None:
    pipeline, _, sent = make(max_queue_rows=1, max_wait_s=10.0)
    pipeline.submit(EmbedRequest("a", texts=["x"]))
    pipeline.submit(EmbedRequest("b", texts=["y"]))
    assert isinstance(sent[0], RequestError) and sent[0].code == "overloaded"
    assert sent[0].request_id == "b"
    pipeline.close()
