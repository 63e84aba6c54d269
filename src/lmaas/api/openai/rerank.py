"""``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``, as vLLM serves it): schema and handler.

The body is the one vLLM, Jina and Cohere clients send: ``query``, ``documents`` (strings, or
Cohere's ``{"text": ...}`` objects), optional ``top_n`` and ``return_documents``. The answer lists
the documents by relevance, best first: ``{id, model, usage, results: [{index, relevance_score,
document: {text}}]}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse, request_id_of, set_model_label
from lmaas.api.engine_calls import run_infer
from lmaas.api.openai.base import OpenAIBaseModel, check_text, resolve_model
from lmaas.api.services import ApiServices, services_of
from lmaas.api.sse import cancel_on_disconnect
from lmaas.core.errors import InternalError, InvalidRequestError
from lmaas.core.messages import RerankRequest, ScoreResult
from lmaas.core.types import Task

router = APIRouter(tags=["openai"])


class RerankDocument(OpenAIBaseModel):
    """A document as Cohere's v1 API also accepts it: an object with its text."""

    text: str


class RerankBody(OpenAIBaseModel):
    """The body of ``POST /v1/rerank``."""

    model: str = Field(min_length=1, max_length=256)
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = None
    """Return the best ``top_n`` documents; None or 0 (vLLM's default) return all of them."""
    return_documents: bool = True
    """Echo each document's text in the results (Cohere v1 and Jina default to true; vLLM
    always does)."""
    user: str | None = None


def to_rerank_request(body: RerankBody, request_id: str, max_documents: int) -> RerankRequest:
    """Validate the body. Raises: InvalidRequestError (400) naming the parameter at fault."""
    if not body.query.strip():
        raise InvalidRequestError("'query' must not be empty", param="query")
    check_text(body.query, "query")
    if not body.documents:
        raise InvalidRequestError("'documents' must not be empty", param="documents")
    if len(body.documents) > max_documents:
        raise InvalidRequestError(
            f"'documents' has {len(body.documents)} items; at most {max_documents} are allowed",
            param="documents",
        )
    if body.top_n is not None and body.top_n < 0:
        raise InvalidRequestError(
            f"'top_n' must be at least 1 (or 0 for all documents), got {body.top_n}",
            param="top_n",
        )
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequestError(f"'documents[{i}]' is empty", param=f"documents[{i}]")
        check_text(text, f"documents[{i}]")
    return RerankRequest(request_id, body.query, texts)


def rerank_body(
    result: ScoreResult, request: RerankRequest, body: RerankBody, model: str
) -> dict[str, Any]:
    """Results sorted by score (ties keep input order), cut to ``top_n``."""
    if len(result.scores) != len(request.documents):
        num_docs = len(request.documents)
        raise InternalError(f"the worker returned {len(result.scores)} scores for {num_docs} docs")
    order = sorted(range(len(result.scores)), key=lambda i: (-result.scores[i], i))
    if body.top_n:
        order = order[: body.top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        entry: dict[str, Any] = {"index": i, "relevance_score": result.scores[i]}
        if body.return_documents:
            entry["document"] = {"text": request.documents[i]}
        results.append(entry)
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {
        "id": f"rerank-{request.request_id}",
        "model": model,
        "usage": usage,
        "results": results,
    }


async def _rerank(services: ApiServices, model: str, rerank: RerankRequest) -> ScoreResult:
    return await run_infer(services, model, rerank, ScoreResult)


@router.post("/v1/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def create_rerank(body: RerankBody, request: Request) -> Response:
    """Rank documents by their relevance to the query with a cross-encoder."""
    services = services_of(request)
    model = resolve_model(services.engine, body.model, {Task.RERANK}, "/v1/rerank")
    set_model_label(request.scope, model.name)
    max_documents = services.config.max_rerank_documents
    rerank = to_rerank_request(body, request_id_of(request.scope), max_documents)
    result = await cancel_on_disconnect(request.receive, _rerank(services, model.ref, rerank))
    return JsonResponse(rerank_body(result, rerank, body, model.name))
