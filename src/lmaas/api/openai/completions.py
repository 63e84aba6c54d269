"""``POST /v1/completions``: schema, router and handler."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import request_id_of, set_model_label
from lmaas.api.openai.base import MAX_TOKEN_ID, check_text, reject_set, resolve_model
from lmaas.api.openai.generation import GenerationCall, run_generation
from lmaas.api.openai.sampling import MAX_N, SamplingFields
from lmaas.api.services import services_of
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import GenerateRequest
from lmaas.core.types import Task

router = APIRouter(tags=["openai"])
MAX_COMPLETION_LOGPROBS = 5

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    echo: bool | None = None
    suffix: str | None = None

    def rejections(self) -> dict[str, bool]:
        return {"echo": bool(self.echo), "suffix": bool(self.suffix)}

    def check_best_of(self) -> None:
        """best_of = n is plain sampling; ranking several candidates is not implemented."""
        n = self.n or 1
        if self.best_of is not None and self.best_of != n:
            raise InvalidRequestError(
                f"best_of ({self.best_of}) other than n ({n}) is not supported", param="best_of"
            )


def split_prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, token ids): exactly one is set. Raises: InvalidRequestError for batches / empty."""
    if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        raise InvalidRequestError("batch prompts are not supported", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return check_text(prompt, "prompt"), None
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    return None, [int(t) for t in prompt]


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI (legacy) text completions, streamed as SSE when ``stream`` is true."""
    services = services_of(request)
    allowed = {Task.CHAT, Task.COMPLETION, Task.SEQ2SEQ}
    model = resolve_model(services.engine, body.model, allowed, "/v1/completions")
    set_model_label(request.scope, model.name)
    reject_set(body.rejections())
    body.check_best_of()
    text, token_ids = split_prompt(body.prompt)
    generate = GenerateRequest(
        request_id=request_id_of(request.scope),
        sampling=body.to_sampling(model, body.max_tokens, body.logprobs),
        prompt=text,
        prompt_token_ids=token_ids,
        add_generation_prompt=False,
    )
    call = GenerationCall(
        services,
        request,
        model.name,
        "text",
        body.include_usage(),
        n=generate.sampling.n,
        logprobs=body.logprobs is not None,
        engine_ref=model.ref,
    )
    return await run_generation(call, generate, body.stream)
