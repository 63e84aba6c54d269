"""Calling the engine for one-result requests, the same way from every route.

The request deadline, the in-flight gauge and the token counters are applied here once, for the
OpenAI routes (embeddings, rerank, classify, transcriptions) and the v2 infer route alike.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from lmaas.api.services import ApiServices
from lmaas.core.errors import DeadlineExceededError, InternalError
from lmaas.core.messages import InferRequest, InferResult

R = TypeVar("R", bound=InferResult)


async def run_infer(services: ApiServices, ref: str, request: InferRequest, expected: type[R]) -> R:
    """Send ``request`` to ``ref`` (``name``, or ``name:version`` when the client pinned one:
    :attr:`~lmaas.engine.protocol.ServedModel.ref`) under the request deadline; the result must
    be ``expected``.

    Raises:
        DeadlineExceededError: past ``request_timeout_s`` (the worker is told to abort).
        InternalError: the worker answered with another result type.
        LmaasError: whatever the engine raised (not ready, overloaded, invalid input...).
    """
    timeout_s = services.config.request_timeout_s
    model = ref.partition(":")[0]  # metrics are labelled by model name
    services.metrics.request_started(model)
    try:
        async with asyncio.timeout(timeout_s):
            result = await services.engine.infer(ref, request)
    except TimeoutError:
        raise DeadlineExceededError(
            f"the request ran past its deadline of {timeout_s:g} s"
        ) from None
    finally:
        services.metrics.request_finished(model)
    if not isinstance(result, expected):
        raise InternalError(f"the worker answered with {type(result).__name__}")
    prompt_tokens = getattr(result, "prompt_tokens", 0)
    if prompt_tokens:
        services.metrics.add_tokens(model, prompt_tokens=prompt_tokens)
    return result
