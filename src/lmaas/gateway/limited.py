"""The engine under a principal's rate limits: admit before a model call, settle after it.

Like :mod:`lmaas.gateway.visibility`, this is a per-request view of the engine that
``lmaas.api.services.services_of`` hands to routes, so every model call of every route (chat,
completions, embeddings, rerank, classify, transcriptions, v2 infer, and routes yet to come)
is limited with no code in the route. Admission happens before anything is streamed (with the
in-process limiter when the call is made; with a shared one (Redis), or when a quota window must
first be loaded from the usage table, both of which await, when the stream's first item is
asked for, which every route does before it answers), so a refused
request is a plain 429 with ``Retry-After``. The reservation is
settled to the tokens the worker reports (prompt + generated) when the call ends, streams
included (when the stream is closed, also by a client that went away).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from lmaas.core.messages import (
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    SeqDelta,
    TranscribeRequest,
    TranscriptionResult,
)
from lmaas.engine.protocol import EngineClient, ServedModel
from lmaas.gateway.keys import Principal, key_prefix
from lmaas.gateway.limits import Hold, InProcessLimiter, SharedLimiter, Subject
from lmaas.gateway.quotas import NO_CHARGE, Charge, estimate_audio_seconds

Limiter = InProcessLimiter | SharedLimiter
"""The in-process limiter (one gateway) or a shared one (several gateways)."""

CHARS_PER_TOKEN = 4
"""Prompt tokens are estimated from text at admission (the gateway does not tokenize); the
real count replaces the estimate when the request ends."""
DEFAULT_CONTEXT_TOKENS = 2048
"""What a request without max_tokens reserves when the model's context length is unknown."""


def subjects_of(principal: Principal) -> list[Subject]:
    """The key and its tenant, each with its limits (only those that have any)."""
    subjects = [
        Subject("key", key_prefix(principal.key_id), principal.key_limits),
        Subject("tenant", principal.tenant, principal.tenant_limits),
    ]
    return [s for s in subjects if s.limits.any]


def charge_of(request: object) -> Charge:
    """What a request carries that quotas count besides requests and tokens: the images of a
    classification, the audio seconds of a transcription (from a WAV header; settled to the
    worker's measure when the request ends)."""
    if isinstance(request, ClassifyRequest):
        if request.images is not None:
            return Charge(images=len(request.images))
        if request.pixel_values is not None and request.pixel_values.shape:
            return Charge(images=max(0, int(request.pixel_values.shape[0])))
        return NO_CHARGE
    if isinstance(request, TranscribeRequest):
        return Charge(audio_seconds=estimate_audio_seconds(request.audio))
    return NO_CHARGE


def _text_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


def estimate_prompt_tokens(request: object) -> int:
    """A cheap upper-ish estimate of the input tokens of any engine request (0 without text)."""
    if isinstance(request, GenerateRequest):
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        if request.messages is not None:
            return sum(_text_tokens(m.content) + 4 for m in request.messages)
        return _text_tokens(request.prompt or "")
    if isinstance(request, EmbedRequest) and request.token_ids is not None:
        return sum(len(ids) for ids in request.token_ids)
    total = 0
    if isinstance(request, msgspec.Struct):
        for name in request.__struct_fields__:
            value = getattr(request, name)
            if isinstance(value, str) and name not in ("request_id", "tenant"):
                total += _text_tokens(value)
            elif isinstance(value, list) and value and isinstance(value[0], str):
                total += sum(_text_tokens(v) for v in value if isinstance(v, str))
    return total


class LimitedEngineClient:
    """An :class:`~lmaas.engine.protocol.EngineClient` that admits each model call against the
    principal's key and tenant limits (429 past one), and settles its tokens when it ends.

    Args:
        engine: The engine (already the principal's view of it).
        principal: Whose limits apply.
        limiter: The gateway's limiter.
    """

    def __init__(self, engine: EngineClient, principal: Principal, limiter: Limiter) -> None:
        self._engine = engine
        self._subjects = subjects_of(principal)
        self._limiter = limiter

    def list_models(self) -> list[ServedModel]:
        return self._engine.list_models()

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        return self._engine.get_model(name, version)

    def is_ready(self) -> bool:
        return self._engine.is_ready()

    def _generation_budget(self, model: str, request: GenerateRequest, prompt: int) -> int:
        sampling = request.sampling
        if sampling.max_tokens is not None:
            return sampling.max_tokens * max(1, sampling.n)
        info = self._engine.get_model(model).info
        context = info.context_length if info and info.context_length else DEFAULT_CONTEXT_TOKENS
        return max(1, context - prompt) * max(1, sampling.n)

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        prompt = estimate_prompt_tokens(request)
        reserve = prompt + self._generation_budget(model, request, prompt)
        limiter = self._limiter
        if not isinstance(limiter, InProcessLimiter) or limiter.unseeded(self._subjects):
            # Admission must await (Redis, or a quota window to load): on the first item.
            start = _Start(self._engine, model, request, lambda: self._admit(reserve))
            return _SettledStream(None, None, start)
        admission = limiter.admit(self._subjects, reserve)
        try:
            stream = self._engine.generate(model, request)
        except BaseException:
            admission.finish(0)
            raise
        return _SettledStream(stream, admission)

    async def _admit(self, tokens: int, charge: Charge = NO_CHARGE) -> Hold:
        return await self._limiter.admit_async(self._subjects, tokens, charge)

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        admission = await self._admit(estimate_prompt_tokens(request))
        used = 0
        try:
            result = await self._engine.embed(model, request)
            used = result.prompt_tokens
            return result
        finally:
            admission.finish(used)

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        charge = charge_of(request)
        admission = await self._admit(estimate_prompt_tokens(request), charge)
        used = 0
        audio: float | None = None
        try:
            result = await self._engine.infer(model, request)
            used = int(getattr(result, "prompt_tokens", 0) or 0)
            if isinstance(result, TranscriptionResult):
                audio = float(result.duration_s)
            return result
        finally:
            admission.finish(used, audio)


class _Start:
    """What a stream whose admission must await does on its first item: admit, then call."""

    __slots__ = ("admit", "engine", "model", "request")

    def __init__(
        self,
        engine: EngineClient,
        model: str,
        request: GenerateRequest,
        admit: Callable[[], Awaitable[Hold]],
    ) -> None:
        self.engine = engine
        self.model = model
        self.request = request
        self.admit = admit


class _SettledStream:
    """A token stream that settles its admission when it ends, fails or is closed (also when
    it is closed before its first item, which an async generator's ``finally`` would miss).

    When admission must await, the stream is made lazily: ``start`` admits and calls the engine on
    the first item (a refusal raises from there, before the route answered anything)."""

    __slots__ = ("_admission", "_start", "_stream", "_used")

    def __init__(
        self,
        stream: AsyncIterator[SeqDelta] | None,
        admission: Hold | None,
        start: _Start | None = None,
    ) -> None:
        self._stream = stream
        self._admission = admission
        self._start = start
        self._used = 0

    def __aiter__(self) -> _SettledStream:
        return self

    async def _begin(self) -> AsyncIterator[SeqDelta]:
        start = self._start
        assert start is not None
        self._start = None
        self._admission = await start.admit()
        stream = start.engine.generate(start.model, start.request)
        self._stream = stream
        return stream

    async def __anext__(self) -> SeqDelta:
        stream = self._stream
        try:
            if stream is None:
                if self._start is None:
                    raise StopAsyncIteration  # closed before it started
                stream = await self._begin()
            delta = await anext(stream)
        except BaseException:  # the end, an error or a cancellation: the stream is over
            if self._admission is not None:
                self._admission.finish(self._used)
            raise
        self._used += delta.prompt_tokens + delta.num_new_tokens
        return delta

    async def aclose(self) -> None:
        self._start = None
        if self._admission is not None:
            self._admission.finish(self._used)
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
