"""What the API layer is given by the composition root (``lmaas.bootstrap``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from starlette.requests import Request

from lmaas.engine.protocol import EngineClient
from lmaas.observability.metrics import Metrics


class ApiConfig(Protocol):
    """The server limits the API enforces; ``lmaas.bootstrap.settings.ServerConfig`` fits it.

    A Protocol rather than an import, because ``api`` sits below ``bootstrap`` in the layers.
    """

    @property
    def max_body_bytes(self) -> int:
        """Request bodies over this size get 413 before they are parsed."""
        ...

    @property
    def max_audio_upload_bytes(self) -> int:
        """Largest audio file a transcription request may upload (413 above it)."""
        ...

    @property
    def request_timeout_s(self) -> float:
        """End-to-end deadline of one inference request (504 past it)."""
        ...

    @property
    def max_rerank_documents(self) -> int:
        """Most documents one rerank request may carry (400 above it)."""
        ...


@dataclass(slots=True, frozen=True)
class DefaultApiConfig:
    """Limits for tests and embedding without settings."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_audio_upload_bytes: int = 25 * 1024 * 1024
    request_timeout_s: float = 600.0
    max_rerank_documents: int = 1000


Lifespan = Callable[[], AbstractAsyncContextManager[None]]
"""Called once at start-up; entered for the whole life of the app (start/stop the engine)."""


def _never_draining() -> bool:
    return False


@dataclass(slots=True)
class ApiServices:
    """Everything :func:`lmaas.api.create_app` needs.

    Args:
        engine: Runs models.
        config: Body cap and request deadline (a ``ServerConfig``).
        metrics: Where the API records its metrics; ``/metrics`` renders it.
        is_draining: True once shutdown started: readiness turns 503.
        version: The lmaas version reported by ``GET /v2``.
        lifespan: Optional async context manager factory wired into the app's lifespan.
    """

    engine: EngineClient
    config: ApiConfig = field(default_factory=DefaultApiConfig)
    metrics: Metrics = field(default_factory=Metrics)
    is_draining: Callable[[], bool] = _never_draining
    version: str = "0.0.0"
    lifespan: Lifespan | None = None


def services_of(request: Request) -> ApiServices:
    """The services :func:`lmaas.api.create_app` stored on the app."""
    services = request.app.state.lmaas_services
    assert isinstance(services, ApiServices)
    return services
