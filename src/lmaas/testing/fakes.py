"""In-process, deterministic fakes for tests and demos (no torch, no worker processes)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmaas.core.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    WorkerCrashedError,
)
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    InferResult,
    ModelInfo,
    SeqDelta,
    TensorSpec,
    TokenLogprob,
)
from lmaas.core.types import ModelState, Task
from lmaas.engine.protocol import EngineClient, ServedModel, model_not_served


@dataclass(slots=True)
class FakeModelSpec:
    """One model the fake engine serves."""

    name: str
    task: Task = Task.CHAT
    version: str = "1"
    state: ModelState = ModelState.READY
    context_length: int = 64
    embedding_dim: int = 8
    created_at: float = field(default_factory=time.time)
    labels: list[str] | None = None
    """Class labels the model reports (classification tasks)."""
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    """The v2 signature the model reports (tensor models; both or neither)."""


def default_fake_models() -> list[FakeModelSpec]:
    """``fake-chat`` (chat), ``fake-completion`` and ``fake-embed`` (embedding, dim 8)."""
    return [
        FakeModelSpec("fake-chat", Task.CHAT),
        FakeModelSpec("fake-completion", Task.COMPLETION),
        FakeModelSpec("fake-embed", Task.EMBEDDING, context_length=512),
    ]


def _words_of(request: GenerateRequest) -> tuple[list[str], int]:
    """The words to echo and the prompt length in (whitespace) tokens."""
    if request.messages is not None:
        num_prompt = sum(len(m.content.split()) for m in request.messages)
        users = [m for m in request.messages if m.role == "user"]
        source = users[-1].content if users else request.messages[-1].content
        return source.split(), num_prompt
    if request.prompt_token_ids is not None:
        ids = request.prompt_token_ids
        return [f"t{i}" for i in ids], len(ids)
    words = (request.prompt or "").split()
    return words, len(words)


def fake_embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector of ``dim`` floats derived from ``text``."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    while len(digest) < dim * 2:
        digest += hashlib.sha256(digest).digest()
    raw = [
        (int.from_bytes(digest[2 * i : 2 * i + 2], "little") / 32767.5) - 1.0 for i in range(dim)
    ]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


class FakeEngineClient:
    """A deterministic :class:`lmaas.engine.protocol.EngineClient` that runs in the caller's loop.

    Chat models echo the last user message word by word (one word = one token; the prompt length
    is the number of whitespace-separated words in all messages). Completion models echo the
    prompt. With ``n`` > 1 every choice echoes the same words, interleaved token by token, each
    delta carrying its choice ``index`` (the prompt is counted on choice 0 only). When logprobs
    are asked for, token ``i`` has logprob ``-0.1 * (i + 1)`` and alternatives ``alt0``,
    ``alt1``… one nat apart. Embedding models return :func:`fake_embedding` vectors.

    Args:
        models: The served models; :func:`default_fake_models` when None.
        token_delay_s: Sleep before each generated token (to test streaming and disconnects).
        fail_after_tokens: Raise :class:`WorkerCrashedError` after this many tokens of a stream.
        draining: Start in the draining state (``is_ready()`` is False).
        error: Raised at the start of every ``generate`` / ``embed`` (to test error mapping).
    """

    def __init__(
        self,
        models: Sequence[FakeModelSpec] | None = None,
        *,
        token_delay_s: float = 0.0,
        fail_after_tokens: int | None = None,
        draining: bool = False,
        error: Exception | None = None,
    ) -> None:
        specs = list(models) if models is not None else default_fake_models()
        self.models: dict[str, FakeModelSpec] = {m.name: m for m in specs}
        self.token_delay_s = token_delay_s
        self.fail_after_tokens = fail_after_tokens
        self.draining = draining
        self.error = error
        self.num_generate_calls = 0
        self.num_embed_calls = 0
        self.num_completed = 0
        self.num_aborted = 0
        self.aborted_request_ids: list[str] = []
        self.last_generate: GenerateRequest | None = None
        self.last_embed: EmbedRequest | None = None
        self.infer_handlers: dict[type, Callable[[str, InferRequest], Awaitable[InferResult]]] = {}
        """Fakes for the other one-result requests, by request type (tests register them)."""
        self.last_infer: InferRequest | None = None

    def set_state(self, name: str, state: ModelState) -> None:
        """Change the state of a served model (to test readiness)."""
        self.models[name].state = state

    def _served(self, spec: FakeModelSpec) -> ServedModel:
        info = ModelInfo(
            context_length=spec.context_length,
            dtype="float32",
            device="cpu",
            embedding_dim=spec.embedding_dim if spec.task is Task.EMBEDDING else None,
            labels=spec.labels,
            inputs=spec.inputs,
            outputs=spec.outputs,
        )
        return ServedModel(spec.name, spec.version, spec.task, spec.state, spec.created_at, info)

    def list_models(self) -> list[ServedModel]:
        return [self._served(spec) for spec in self.models.values()]

    def get_model(self, name: str, version: str | None = None) -> ServedModel:
        spec = self.models.get(name)
        if spec is None or (version is not None and version != spec.version):
            raise model_not_served(name)
        return self._served(spec)

    def is_ready(self) -> bool:
        return not self.draining and all(m.state is ModelState.READY for m in self.models.values())

    def _ready_spec(self, name: str) -> FakeModelSpec:
        if self.error is not None:
            raise self.error
        name, _, version = name.partition(":")  # name:version, as ResolvingEngineClient sends
        spec = self.models.get(name)
        if spec is not None and version and version != spec.version:
            raise model_not_served(name)
        if spec is None:
            raise model_not_served(name)
        if spec.state is not ModelState.READY:
            raise ModelNotReadyError(f"model '{name}' is {spec.state.value}", retry_after_s=2.0)
        return spec

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        self.num_generate_calls += 1
        self.last_generate = request
        return self._generate(model, request)

    async def _generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        spec = self._ready_spec(model)
        words, num_prompt = _words_of(request)
        budget = self._token_budget(spec, request, num_prompt)
        streams = [
            self._echo(request, words, num_prompt if i == 0 else 0, budget, i)
            for i in range(max(1, request.sampling.n))
        ]
        try:
            while streams:
                for stream in list(streams):
                    delta = await anext(stream, None)
                    if delta is None:
                        streams.remove(stream)
                    else:
                        yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self.num_aborted += 1
            self.aborted_request_ids.append(request.request_id)
            raise
        self.num_completed += 1

    @staticmethod
    def _token_budget(spec: FakeModelSpec, request: GenerateRequest, num_prompt: int) -> int:
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="messages")
        max_tokens = request.sampling.max_tokens
        if (
            num_prompt + (max_tokens or 0) > spec.context_length
            or num_prompt >= spec.context_length
        ):
            raise InvalidRequestError(
                f"this model's maximum context length is {spec.context_length} tokens; the "
                f"request has {num_prompt} prompt tokens and max_tokens {max_tokens}",
                param="messages" if request.messages is not None else "prompt",
            )
        return max_tokens if max_tokens is not None else spec.context_length - num_prompt

    async def _echo(
        self, request: GenerateRequest, words: list[str], num_prompt: int, budget: int, index: int
    ) -> AsyncIterator[SeqDelta]:
        sampling = request.sampling
        target = budget if sampling.ignore_eos else max(len(words), sampling.min_tokens)
        target = min(target, budget)
        source = words or ["."]
        text = ""
        for i in range(target):
            if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                raise WorkerCrashedError("the worker serving the model crashed")
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            piece = source[i % len(source)] if i == 0 else " " + source[i % len(source)]
            text += piece
            hit = next((s for s in sampling.stop if s in text), None)
            if hit is not None and i + 1 >= sampling.min_tokens:
                kept = text[: text.index(hit)]
                yield _delta(request, kept[len(text) - len(piece) :], i, num_prompt, "stop", index)
                return
            last = i + 1 == target
            reason = ("length" if target == budget else "stop") if last else None
            yield _delta(request, piece, i, num_prompt, reason, index)

    async def embed(self, model: str, request: EmbedRequest) -> EmbedResult:
        self.num_embed_calls += 1
        self.last_embed = request
        spec = self._ready_spec(model)
        if spec.task is not Task.EMBEDDING:
            raise InvalidRequestError(f"model '{model}' is not an embedding model", param="model")
        texts = request.texts or [" ".join(map(str, ids)) for ids in request.token_ids or []]
        if not texts:
            raise InvalidRequestError("input is empty", param="input")
        dim = request.dimensions or spec.embedding_dim
        if not 1 <= dim <= spec.embedding_dim:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {spec.embedding_dim}, got {dim}",
                param="dimensions",
            )
        rows = [fake_embedding(t, spec.embedding_dim)[:dim] for t in texts]
        flat = [v for row in rows for v in row]
        num_prompt = sum(max(1, len(t.split())) for t in texts)
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        data = struct.pack(f"<{len(flat)}f", *flat)
        return EmbedResult(request.request_id, data, len(texts), dim, num_prompt)

    async def infer(self, model: str, request: InferRequest) -> InferResult:
        self.last_infer = request
        if isinstance(request, EmbedRequest):
            return await self.embed(model, request)
        model = self._ready_spec(model).name
        handler = self.infer_handlers.get(type(request))
        if handler is None:
            raise InvalidRequestError(
                f"model '{model}' does not serve {type(request).__name__}", param="model"
            )
        return await handler(model, request)


def _delta(
    request: GenerateRequest,
    text: str,
    position: int,
    num_prompt: int,
    reason: str | None,
    index: int,
) -> SeqDelta:
    num_logprobs = request.sampling.logprobs
    logprobs = None
    if num_logprobs is not None:
        logprob = -0.1 * (position + 1)
        top = [(f"alt{k}", logprob - k - 1.0) for k in range(num_logprobs)]
        logprobs = [TokenLogprob(text, logprob, top)]
    prompt_tokens = num_prompt if position == 0 else 0
    return SeqDelta(
        request.request_id, text, 1, reason, prompt_tokens, index=index, logprobs=logprobs
    )


if TYPE_CHECKING:
    _conforms: EngineClient = FakeEngineClient()
