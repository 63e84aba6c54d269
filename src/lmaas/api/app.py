"""The app factory: every route of the gateway on one FastAPI app, no module-level state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.admin.audit import router as admin_audit_router
from lmaas.api.admin.deployments import router as admin_deployments_router
from lmaas.api.admin.evaluations import router as admin_evaluations_router
from lmaas.api.admin.jobs import router as admin_jobs_router
from lmaas.api.admin.keys import router as admin_keys_router
from lmaas.api.admin.models import router as admin_models_router
from lmaas.api.admin.tenants import router as admin_tenants_router
from lmaas.api.admin.usage import router as admin_usage_router
from lmaas.api.auth import METRICS_PATH, PUBLIC_PATHS, AuthMiddleware
from lmaas.api.context import JsonResponse
from lmaas.api.errors import install_error_handlers
from lmaas.api.kserve_v2.router import router as v2_router
from lmaas.api.metering import MeteringMiddleware
from lmaas.api.middleware import RequestContextMiddleware
from lmaas.api.openai.audio import audio_body_caps
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
    admin_tenants_router,
    admin_keys_router,
    admin_evaluations_router,
    admin_jobs_router,
    admin_deployments_router,
    admin_models_router,
    admin_usage_router,
    admin_audit_router,
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
        A FastAPI app; its lifespan enters ``services.lifespan()`` when one is given. With
        ``services.auth`` every route but the probes needs a key (``lmaas.api.auth``).
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
    if services.meter is not None:
        # Innermost: runs after authentication, sees the final status of every response.
        app.add_middleware(MeteringMiddleware, meter=services.meter)
    if services.auth is not None:
        # Added first, so it runs inside the request-context middleware (ids, metrics, body cap).
        app.add_middleware(
            AuthMiddleware, authenticator=services.auth, public_metrics=services.public_metrics
        )
        _document_auth(app, services.public_metrics)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=services.metrics,
        max_body_bytes=services.config.max_body_bytes,
        body_caps=audio_body_caps(services.config),
    )
    return app


def _document_auth(app: FastAPI, public_metrics: bool) -> None:
    """Declare the two ways to send a key in ``/openapi.json`` (and the open routes as open)."""
    build = app.openapi
    public = PUBLIC_PATHS | ({METRICS_PATH} if public_metrics else set())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "lmaas-<id>-<secret>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKey": []}]
        for path, operations in schema.get("paths", {}).items():
            if path in public:
                for operation in operations.values():
                    operation["security"] = []
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override hook
