"""Open Inference Protocol v2 routes: server and model metadata, health, readiness, inference."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse, request_id_of, set_model_label
from lmaas.api.kserve_v2.encoding import HEADER_LENGTH, encode_response, select_outputs
from lmaas.api.kserve_v2.handler import infer, model_config, model_metadata
from lmaas.api.kserve_v2.tensors import parse_infer
from lmaas.api.services import services_of
from lmaas.core.errors import ModelNotReadyError, ServiceUnavailableError
from lmaas.core.types import ModelState
from lmaas.engine.protocol import ServedModel

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

EXTENSIONS = ["binary_tensor_data", "model_configuration"]


@router.get("")
async def server_metadata(request: Request) -> Response:
    """Server name, version and protocol extensions."""
    version = services_of(request).version
    return JsonResponse({"name": "lmaas", "version": version, "extensions": EXTENSIONS})


@router.get("/health/live")
async def live() -> Response:
    """200 while the process answers."""
    return JsonResponse({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """200 when every model is ready and the server is not draining, else 503."""
    services = services_of(request)
    if services.is_draining():
        raise ServiceUnavailableError("the server is draining", retry_after_s=5.0)
    if not services.engine.is_ready():
        raise ServiceUnavailableError("not every model is ready", retry_after_s=2.0)
    return JsonResponse({"ready": True})


def _model(request: Request, name: str, version: str | None) -> ServedModel:
    model = services_of(request).engine.get_model(name, version)
    set_model_label(request.scope, model.name)
    return model


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def metadata(name: str, request: Request, version: str | None = None) -> Response:
    """Model metadata in the shape ``tritonclient`` expects."""
    return JsonResponse(model_metadata(_model(request, name, version)))


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def config(name: str, request: Request, version: str | None = None) -> Response:
    """A minimal Triton-style model configuration."""
    return JsonResponse(model_config(_model(request, name, version)))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    """200 when the model is ready, 503 while it is not, 404 when unknown."""
    model = _model(request, name, version)
    if model.state is not ModelState.READY:
        raise ModelNotReadyError(f"model '{name}' is {model.state.value}", retry_after_s=2.0)
    return JsonResponse({"name": model.name, "ready": True})


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def model_infer(name: str, request: Request, version: str | None = None) -> Response:
    """Inference with JSON or binary tensors; the request ``id`` is echoed."""
    services = services_of(request)
    model = _model(request, name, version)
    parsed = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
    outputs = await infer(services, model, parsed, request_id_of(request.scope))
    chosen = select_outputs(parsed, outputs)
    header: dict[str, object] = {"model_name": model.name, "model_version": model.version}
    if parsed.id is not None:
        header["id"] = parsed.id
    body, headers = encode_response(header, chosen)
    return Response(body, headers=headers)
