"""The Runner seam: what a worker process drives, whatever the task or backend.

Runners are synchronous and live in a worker process, which owns the thread they run on. The
worker calls :meth:`Runner.load` once, :meth:`Runner.warmup` once, then feeds requests:

* a :class:`GenerationRunner` is stepped: ``add_request`` / ``abort`` between steps, and each
  ``step()`` returns the new output of every running sequence;
* an :class:`EmbeddingRunner` is called with a batch of requests at a time.

Errors a caller should see are raised as :class:`lmaas.core.errors.LmaasError` (for instance
``InvalidRequestError`` for a prompt over the context), and reported for that request only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
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


class RunnerFactory(Protocol):
    def __call__(self, spec: WorkerSpec) -> Runner: ...
