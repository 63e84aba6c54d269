"""``POST /v1/chat/completions``: schema, router and handler."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import request_id_of, set_model_label
from lmaas.api.openai.base import (
    MAX_NUM_MESSAGES,
    MAX_TOKENS_LIMIT,
    OpenAIBaseModel,
    check_text,
    reject_set,
    resolve_model,
)
from lmaas.api.openai.generation import GenerationCall, run_generation
from lmaas.api.openai.sampling import SamplingFields
from lmaas.api.services import services_of
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ChatMessage, GenerateRequest
from lmaas.core.types import Task

router = APIRouter(tags=["openai"])
MAX_TOP_LOGPROBS = 20


class ContentPart(OpenAIBaseModel):
    """One part of a message's content; only ``{"type": "text", "text": …}`` is served."""

    type: str
    text: str | None = None


class ChatMessageIn(OpenAIBaseModel):
    """One message of the conversation."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_NUM_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def rejections(self) -> dict[str, bool]:
        return {
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none"),
        }


def num_logprobs(body: ChatCompletionRequest) -> int | None:
    """``logprobs`` / ``top_logprobs`` as one number (None: no logprobs).

    Raises: InvalidRequestError for top_logprobs without logprobs.
    """
    if not body.logprobs:
        if body.top_logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true", param="top_logprobs"
            )
        return None
    return body.top_logprobs or 0


def _content_text(message: ChatMessageIn, index: int) -> str:
    param = f"messages[{index}].content"
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return check_text(message.content, param)
    texts: list[str] = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"{param}[{j}]: content part type '{part.type}' is not supported; only text is",
                param=f"{param}[{j}]",
            )
        texts.append(check_text(part.text, f"{param}[{j}].text"))
    return "\n".join(texts)


def to_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    """Engine messages: text content only, validated."""
    return [ChatMessage(m.role, _content_text(m, i)) for i, m in enumerate(body.messages)]


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions, streamed as SSE when ``stream`` is true."""
    services = services_of(request)
    model = resolve_model(services.engine, body.model, {Task.CHAT}, "/v1/chat/completions")
    set_model_label(request.scope, model.name)
    reject_set(body.rejections())
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = num_logprobs(body)
    generate = GenerateRequest(
        request_id=request_id_of(request.scope),
        sampling=body.to_sampling(model, max_tokens, logprobs),
        messages=to_messages(body),
    )
    call = GenerationCall(
        services,
        request,
        model.name,
        "chat",
        body.include_usage(),
        n=generate.sampling.n,
        logprobs=logprobs is not None,
        engine_ref=model.ref,
    )
    return await run_generation(call, generate, body.stream)
