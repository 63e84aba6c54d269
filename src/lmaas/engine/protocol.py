"""The EngineClient seam: all the API layer may call to run a model.

Implementations: :class:`lmaas.engine.local.LocalEngineClient` (worker processes on this machine),
:class:`lmaas.testing.FakeEngineClient` (in-process, for tests), and later a Ray implementation.
The seam speaks engine messages, never a wire protocol (OpenAI or KServe types stay in ``api``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from lmaas.core.errors import ModelNotFoundError
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    ModelInfo,
    SeqDelta,
)
from lmaas.core.types import ModelState, Task


@dataclass(slots=True, frozen=True)
class ServedModel:
    """A model version the engine serves, as the API lists it."""

    name: str
    version: str
    task: Task
    state: ModelState
    created_at: float
    """Unix time the version was imported."""
    info: ModelInfo | None = None
    """Known once the worker has loaded the model."""
    error: str | None = None
    """Why the model failed to load, when state is FAILED."""
    pinned: bool = False
    """The client named this version (``name:version`` or ``name@alias``): requests go to it
    even when the name's deployment routes to several versions."""

    @property
    def ref(self) -> str:
        """What to hand the engine for a request: ``name``, or ``name:version`` when pinned."""
        return f"{self.name}:{self.version}" if self.pinned else self.name


def model_not_served(name: str) -> ModelNotFoundError:
    """The one error for a model that is not served, so that a model hidden from a caller
    (``lmaas.gateway.visibility``) answers exactly like one that does not exist."""
    return ModelNotFoundError(f"model {name!r} is not served here", param="model")


class EngineClient(Protocol):
    def list_models(self) -> list[ServedModel]:
        """Every served model, ready or not."""
        ...

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        """Raises: ModelNotFoundError when no such model (or version) is served."""
        ...

    def is_ready(self) -> bool:
        """True when every served model is ready and the engine is not draining."""
        ...

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        """Stream the output of one request; closing the iterator early aborts the request.

        Raises:
            ModelNotFoundError: unknown model.
            ModelNotReadyError, OverloadedError, WorkerCrashedError, DrainingError: retryable.
            InvalidRequestError: the worker refused the request (e.g. context overflow).
            DeadlineExceededError: the request ran past its deadline.
        """
        ...

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        """Embed inputs. Raises: as :meth:`generate`."""
        ...

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        """Run a one-result request (rerank, classify, transcribe, tensor, embed); the result
        type follows the request type. Raises: as :meth:`generate`."""
        ...
