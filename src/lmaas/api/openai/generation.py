"""Running one generation for chat or completions: deadline, aggregation, streaming, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse, request_id_of
from lmaas.api.openai.choices import ChoiceState, Kind
from lmaas.api.services import ApiServices
from lmaas.api.sse import SseResponse, aclose_quietly, cancel_on_disconnect, sse_events
from lmaas.core.errors import DeadlineExceededError
from lmaas.core.messages import GenerateRequest, SeqDelta


@dataclass(slots=True)
class GenerationCall:
    """The state of one generation request, from the engine call to the last byte."""

    services: ApiServices
    request: Request
    model: str
    kind: Kind
    include_usage: bool
    n: int = 1
    logprobs: bool = False
    """Render logprobs (the engine sends them on each delta when asked)."""
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    start_s: float = field(default_factory=time.perf_counter)
    deadline: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    iterator: AsyncIterator[SeqDelta] | None = None
    choices: list[ChoiceState] = field(default_factory=list)
    streaming: bool = False
    _closed: bool = False
    engine_ref: str = ""
    """What the engine is asked for (``name:version`` when the client pinned a version);
    ``model`` when empty."""

    def __post_init__(self) -> None:
        self.request_id = request_id_of(self.request.scope)
        self.choices = [ChoiceState(i) for i in range(self.n)]
        timeout_s = self.services.config.request_timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id

    async def next_delta(self) -> SeqDelta | None:
        """The next delta, None at the end. Raises: DeadlineExceededError past the deadline."""
        assert self.iterator is not None
        try:
            async with asyncio.timeout_at(self.deadline):
                delta = await anext(self.iterator)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            timeout_s = self.services.config.request_timeout_s
            raise DeadlineExceededError(
                f"the request ran past its deadline of {timeout_s:g} s"
            ) from None
        if delta.prompt_tokens and not self.prompt_tokens:
            # Counted once: the n choices share one prompt.
            self.services.metrics.observe_ttft(self.model, time.perf_counter() - self.start_s)
            self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += delta.num_new_tokens
        if 0 <= delta.index < self.n:
            self.choices[delta.index].add(delta, keep=not self.streaming)
        return delta

    def unfinished(self) -> list[ChoiceState]:
        return [c for c in self.choices if c.finish_reason is None]

    async def close(self) -> None:
        """Close the engine iterator (aborting an unfinished request) and count tokens, once."""
        if self._closed:
            return
        self._closed = True
        if self.iterator is not None:
            await aclose_quietly(self.iterator)
        metrics = self.services.metrics
        metrics.add_tokens(
            self.model,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.completion_tokens,
        )
        metrics.request_finished(self.model)

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.response_id,
            "object": obj + ".chunk" if chunk and self.kind == "chat" else obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def full_response(self) -> dict[str, Any]:
        choices = [c.full(self.kind, self.logprobs) for c in self.choices]
        body = self._envelope(choices, chunk=False)
        body["usage"] = self.usage()
        return body

    def chunk(self, delta: SeqDelta) -> dict[str, Any]:
        state = self.choices[delta.index]
        entries = (delta.logprobs or []) if self.logprobs else None
        choice = state.chunk(self.kind, delta.text, entries, delta.finish_reason)
        return self._envelope([choice], chunk=True)

    def closing_chunk(self, state: ChoiceState) -> dict[str, Any]:
        """``finish_reason: stop`` for a choice the engine ended without one."""
        state.finish_reason = "stop"
        choice = state.chunk(self.kind, "", [] if self.logprobs else None, "stop")
        return self._envelope([choice], chunk=True)

    def usage_chunk(self) -> dict[str, Any]:
        body = self._envelope([], chunk=True)
        body["usage"] = self.usage()
        return body


async def run_generation(call: GenerationCall, request: GenerateRequest, stream: bool) -> Response:
    """Start ``request`` on the engine and answer with one JSON body or an SSE stream.

    Errors before the first delta become ordinary HTTP errors; errors after it go through
    :mod:`lmaas.api.sse` as a final error event.
    """
    call.services.metrics.request_started(call.model)
    handed_off = False
    try:
        call.iterator = call.services.engine.generate(call.engine_ref or call.model, request)
        if not stream:
            return await cancel_on_disconnect(call.request.receive, _collect(call))
        call.streaming = True
        first = await call.next_delta()
        handed_off = True
        events = sse_events(_chunks(call, first), call.request_id)
        return SseResponse(events, on_close=call.close)
    finally:
        if not handed_off:
            await call.close()


async def _collect(call: GenerationCall) -> Response:
    while await call.next_delta() is not None:
        pass
    return JsonResponse(call.full_response())


async def _chunks(call: GenerationCall, first: SeqDelta | None) -> AsyncIterator[dict[str, Any]]:
    delta = first
    while delta is not None:
        in_range = 0 <= delta.index < call.n
        if in_range and (delta.text or delta.finish_reason is not None or delta.logprobs):
            yield call.chunk(delta)
        delta = await call.next_delta()
    for state in call.unfinished():
        yield call.closing_chunk(state)
    if call.include_usage:
        yield call.usage_chunk()
