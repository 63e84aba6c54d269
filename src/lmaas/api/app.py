"""The app factory: every route of the gateway on one FastAPI app, no module-level state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse
from lmaas.api.errors import install_error_handlers
from lmaas.api.kserve_v2.router import router as v2_router
from lmaas.api.middleware import RequestContextMiddleware
from lmaas.api.openai.audio import TRANSCRIPTIONS_PATH, transcription_body_cap
from lmaas.api.openai.audio import router as audio_router
from lmaas.api.openai.chat import router as chat_router
from lmaas.api.openai.classify import router as classify_router
from lmaas.api.openai.completions import router as completions_router
from lmaas.api.openai.embeddings import router as embeddings_router
from lmaas.api.openai.models import router as models_router
from lmaas.api.openai.rerank import router as rerank_router
from lmaas.api.services import ApiServices, services_of

__all__ = ["ApiServices", "create_app"]

system_router = APIRouter(tags=["system"])


@system_router.get("/health")
async def health() -> Response:
    """Liveness: 200 while the process answers."""
    return JsonResponse({"status": "ok"})


@system_router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the gateway's metrics."""
    body, content_type = services_of(request).metrics.render()
    return Response(body, headers={"Content-Type": content_type})


_ROUTERS = (
    models_router,
    chat_router,
    completions_router,
    embeddings_router,
    rerank_router,
    classify_router,
    audio_router,
    v2_router,
    system_router,
)


def _lifespan(services: ApiServices) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if services.lifespan is None:
            yield
            return
        async with services.lifespan():
            yield

    return lifespan


def create_app(services: ApiServices) -> FastAPI:
    """Build the HTTP app over ``services``: OpenAI and v2 routes, ``/health``, ``/metrics``.

    Args:
        services: The engine, limits, metrics and lifecycle hook the app runs on.

    Returns:
        A FastAPI app; its lifespan enters ``services.lifespan()`` when one is given.
    """
    app = FastAPI(
        title="lmaas",
        version=services.version,
        lifespan=_lifespan(services),
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.lmaas_services = services
    for router in _ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=services.metrics,
        max_body_bytes=services.config.max_body_bytes,
        body_caps={TRANSCRIPTIONS_PATH: transcription_body_cap(services.config)},
    )
    return app
