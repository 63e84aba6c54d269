"""``POST /v1/classify`` (also ``/classify``): vLLM's classification shape, for texts and images.

``input`` is a string or a list of them. For ``image-classification`` models each input is an
image sent inline, as a ``data:image/...;base64,...`` string or an OpenAI content part
``{"type": "image_url", "image_url": {"url": "data:..."}}``. Each result carries the top
``label``, its ``score`` and ``probs`` over all ``num_classes`` classes (in the model's label
order, as ``/v2/models/{m}`` lists it).
"""

from __future__ import annotations

import struct
import time
from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse, request_id_of, set_model_label
from lmaas.api.engine_calls import run_infer
from lmaas.api.openai.base import MAX_NUM_EMBED_INPUTS, OpenAIBaseModel, check_text, resolve_model
from lmaas.api.openai.images import (
    ImageContent,
    decode_image_url,
    image_url_of,
    is_image_data_url,
)
from lmaas.api.services import ApiServices, services_of
from lmaas.api.sse import cancel_on_disconnect
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ClassifyRequest, ClassifyResult
from lmaas.core.types import Task
from lmaas.engine.protocol import ServedModel

router = APIRouter(tags=["openai"])

MAX_NUM_CLASSIFY_INPUTS = MAX_NUM_EMBED_INPUTS
_TASKS = {Task.CLASSIFICATION, Task.IMAGE_CLASSIFICATION}

ClassifyItem = str | ImageContent


class ClassifyBody(OpenAIBaseModel):
    """The body of ``POST /v1/classify``."""

    model: str = Field(min_length=1, max_length=256)
    input: ClassifyItem | list[ClassifyItem]
    user: str | None = None


def _items(body: ClassifyBody) -> list[ClassifyItem]:
    items = body.input if isinstance(body.input, list) else [body.input]
    if not items:
        raise InvalidRequestError("'input' must not be empty", param="input")
    if len(items) > MAX_NUM_CLASSIFY_INPUTS:
        raise InvalidRequestError(
            f"'input' has {len(items)} items; at most {MAX_NUM_CLASSIFY_INPUTS} are allowed",
            param="input",
        )
    return items


def to_classify_request(body: ClassifyBody, model: ServedModel, request_id: str) -> ClassifyRequest:
    """Texts for text classifiers, decoded images for image classifiers.

    Raises:
        InvalidRequestError: empty or too many inputs, an image for a text model (or the
            reverse), a remote or malformed image URL, an empty or invalid string.
    """
    items = _items(body)
    multi = isinstance(body.input, list)

    def param(i: int) -> str:
        return f"input[{i}]" if multi else "input"

    if model.task is Task.IMAGE_CLASSIFICATION:
        images = [
            decode_image_url(item if isinstance(item, str) else image_url_of(item), param(i))
            for i, item in enumerate(items)
        ]
        return ClassifyRequest(request_id, images=images)
    texts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, ImageContent) or is_image_data_url(item):
            raise InvalidRequestError(
                f"model '{model.name}' classifies text, not images; '{param(i)}' is an image",
                param=param(i),
            )
        if not item.strip():
            raise InvalidRequestError(f"'{param(i)}' is empty", param=param(i))
        texts.append(check_text(item, param(i)))
    return ClassifyRequest(request_id, texts=texts)


def classify_body(result: ClassifyResult, model: ServedModel, request_id: str) -> dict[str, Any]:
    """vLLM's response shape, plus each result's top ``score``."""
    num = result.num_labels
    known = model.info.labels if model.info is not None else None
    labels = known if known and len(known) == num else [f"LABEL_{i}" for i in range(num)]
    flat = struct.unpack(f"<{result.num_inputs * num}f", result.probs)
    data: list[dict[str, Any]] = []
    for i in range(result.num_inputs):
        probs = list(flat[i * num : (i + 1) * num])
        best = max(range(num), key=probs.__getitem__)
        data.append(
            {
                "index": i,
                "label": labels[best],
                "score": probs[best],
                "probs": probs,
                "num_classes": num,
            }
        )
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "total_tokens": result.prompt_tokens,
        "completion_tokens": 0,
    }
    return {
        "id": f"classify-{request_id}",
        "object": "list",
        "created": int(time.time()),
        "model": model.name,
        "data": data,
        "usage": usage,
    }


async def _classify(services: ApiServices, model: str, request: ClassifyRequest) -> ClassifyResult:
    return await run_infer(services, model, request, ClassifyResult)


@router.post("/v1/classify")
@router.post("/classify")
async def create_classification(body: ClassifyBody, request: Request) -> Response:
    """Class probabilities and the top label for each input text or image."""
    services = services_of(request)
    model = resolve_model(services.engine, body.model, _TASKS, "/v1/classify")
    set_model_label(request.scope, model.name)
    request_id = request_id_of(request.scope)
    classify = to_classify_request(body, model, request_id)
    result = await cancel_on_disconnect(request.receive, _classify(services, model.ref, classify))
    return JsonResponse(classify_body(result, model, request_id))
