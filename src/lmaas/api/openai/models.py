"""``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse
from lmaas.api.services import services_of
from lmaas.engine.protocol import ServedModel

router = APIRouter(tags=["openai"])


def model_card(model: ServedModel) -> dict[str, Any]:
    """One entry of OpenAI's model list, plus the model's ``task`` (an extra field the OpenAI
    clients keep): which routes serve it (chat, embedding, rerank, classification...)."""
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at),
        "owned_by": "lmaas",
        "task": model.task.value,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """Every served model, whatever its state (one entry per name)."""
    engine = services_of(request).engine
    latest = {m.name: m for m in engine.list_models()}
    cards = [model_card(m) for m in latest.values()]
    return JsonResponse({"object": "list", "data": cards})


@router.get("/v1/models/{model}")
async def get_model(model: str, request: Request) -> Response:
    """One served model; 404 when unknown."""
    return JsonResponse(model_card(services_of(request).engine.get_model(model)))
