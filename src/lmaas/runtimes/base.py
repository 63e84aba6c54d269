"""The Runner seam: what a worker process drives, whatever the task or backend.

Runners are synchronous and live in a worker process, which owns the thread they run on. The
worker calls :meth:`Runner.load` once, :meth:`Runner.warmup` once, then feeds requests:

* a :class:`GenerationRunner` is stepped: ``add_request`` / ``abort`` between steps, and each
  ``step()`` returns the new output of every running sequence;
* a :class:`BatchRunner` (every task with one result per request: embeddings, rerank,
  classification, speech, tensors) is split Infinity-style into ``preprocess`` (validation,
  tokenisation, decoding; runs on helper threads), ``forward`` (one model call on a batch of rows
  that the worker's dynamic batcher merged from many requests; the worker's own thread) and
  ``postprocess`` (per request, helper threads again), so CPU work overlaps the forward pass.

Errors a caller should see are raised as :class:`lmaas.core.errors.LmaasError` (for instance
``InvalidRequestError`` for a prompt over the context), and reported for that request only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    ModelInfo,
    RequestError,
    SeqDelta,
    WorkerSpec,
)


class Runner(Protocol):
    """Common lifecycle of every runner."""

    def load(self) -> ModelInfo:
        """Load weights and tokenizer. Raises: ModelLoadError with a clear message."""
        ...

    def warmup(self) -> None:
        """Run a tiny request so the first real one does not pay one-off costs."""
        ...

    def health(self) -> bool:
        """True while the runner can serve."""
        ...


@runtime_checkable
class GenerationRunner(Runner, Protocol):
    def add_request(self, request: GenerateRequest) -> None:
        """Admit a request. Raises: InvalidRequestError (e.g. prompt + max_tokens over context)."""
        ...

    def abort(self, request_id: str) -> None:
        """Drop a request and free what it holds; unknown ids are ignored."""
        ...

    def has_work(self) -> bool: ...

    def num_running(self) -> int: ...

    def stats(self) -> dict[str, int]:
        """Counters for heartbeats and metrics (``running``, ``waiting``, KV blocks...)."""
        ...

    def step(self) -> list[SeqDelta]:
        """Advance every running sequence by one token; finished ones carry a finish_reason."""
        ...


@runtime_checkable
class EmbeddingRunner(Runner, Protocol):
    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult | RequestError]:
        """Embed a batch of requests; one result (or error) per request, in order."""
        ...


@dataclass(slots=True)
class Prepared:
    """One request after ``preprocess``: its rows for the batcher and what postprocess needs."""

    request_id: str
    rows: list[tuple[int, Any]]
    """``(length, payload)`` per row; the length (tokens, or another cost unit) groups rows of
    similar size into one batch; the payload is what ``forward`` receives."""
    context: Any = None
    outputs: list[Any] = field(default_factory=list)
    """Filled by the worker: ``forward``'s output for each row, in row order."""


@runtime_checkable
class BatchRunner(Runner, Protocol):
    """A runner whose requests each get one result, batched across requests by the worker."""

    def accepts(self) -> tuple[type, ...]:
        """The request message types it serves (e.g. ``(EmbedRequest,)``)."""
        ...

    def preprocess(self, request: InferRequest) -> Prepared:
        """Validate and prepare one request; thread-safe. Raises: LmaasError (per request)."""
        ...

    def forward(self, payloads: list[Any]) -> list[Any]:
        """Run the model on a batch of row payloads; one output per payload, in order."""
        ...

    def postprocess(self, prepared: Prepared) -> InferResult:
        """Build the result from ``prepared.outputs``; thread-safe."""
        ...


class RunnerFactory(Protocol):
    def __call__(self, spec: WorkerSpec) -> Runner: ...
