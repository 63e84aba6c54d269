"""``POST /v1/embeddings``: schema, router and handler."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse, request_id_of, set_model_label
from lmaas.api.engine_calls import run_infer
from lmaas.api.openai.base import (
    MAX_NUM_EMBED_INPUTS,
    MAX_TOKEN_ID,
    OpenAIBaseModel,
    check_text,
    resolve_model,
)
from lmaas.api.services import ApiServices, services_of
from lmaas.api.sse import cancel_on_disconnect
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import EmbedRequest, EmbedResult
from lmaas.core.types import Task

router = APIRouter(tags=["openai"])

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class EmbeddingRequest(OpenAIBaseModel):
    """The body of ``POST /v1/embeddings``."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    user: str | None = None


def to_embed_request(body: EmbeddingRequest, request_id: str) -> EmbedRequest:
    """Texts or token id lists; empty or oversized input is a 400."""
    items: Any = body.input
    if isinstance(items, str) or (items and isinstance(items[0], int)):
        items = [items]
    if not items:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(items) > MAX_NUM_EMBED_INPUTS:
        raise InvalidRequestError(
            f"input has {len(items)} items; at most {MAX_NUM_EMBED_INPUTS} are allowed",
            param="input",
        )
    if isinstance(items[0], str):
        texts = [check_text(t, f"input[{i}]") for i, t in enumerate(items)]
        return EmbedRequest(request_id, texts=texts, dimensions=body.dimensions)
    if any(not ids for ids in items):
        raise InvalidRequestError("token id lists must not be empty", param="input")
    return EmbedRequest(
        request_id, token_ids=[list(ids) for ids in items], dimensions=body.dimensions
    )


def embedding_body(result: EmbedResult, model: str, encoding: str) -> dict[str, Any]:
    """OpenAI's list shape; base64 is the raw little-endian float32 row, as OpenAI sends it."""
    row_bytes = 4 * result.dim
    data: list[dict[str, Any]] = []
    for i in range(result.num_inputs):
        raw = result.data[i * row_bytes : (i + 1) * row_bytes]
        vector: Any = (
            base64.b64encode(raw).decode("ascii")
            if encoding == "base64"
            else list(struct.unpack(f"<{result.dim}f", raw))
        )
        data.append({"object": "embedding", "index": i, "embedding": vector})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


async def _embed(services: ApiServices, model: str, embed: EmbedRequest) -> EmbedResult:
    return await run_infer(services, model, embed, EmbedResult)


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """OpenAI embeddings for one or more inputs."""
    services = services_of(request)
    model = resolve_model(services.engine, body.model, {Task.EMBEDDING}, "/v1/embeddings")
    set_model_label(request.scope, model.name)
    embed = to_embed_request(body, request_id_of(request.scope))
    result = await cancel_on_disconnect(request.receive, _embed(services, model.ref, embed))
    return JsonResponse(embedding_body(result, model.name, body.encoding_format))
