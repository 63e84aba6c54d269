"""Fake runners for worker-process tests: no torch, no weights, deterministic.

Select one with the manifest/serving option ``runner = "lmaas.testing.fake_runners:echo_runner"``.
Behaviour is set through the spec's options:

* ``token_delay_s``: sleep this long per step (to test streaming, cancellation, draining);
* ``crash_after_tokens``: the worker process dies (``os._exit``) after emitting this many tokens;
* ``fail_load``: loading raises ModelLoadError with this message;
* ``fail_requests``: every generation request fails with an internal error (a broken version,
  to test a canary's automatic rollback);
* ``context_length``: prompts + max_tokens beyond it are refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from lmaas.core.errors import InternalError, InvalidRequestError, ModelLoadError
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    ModelInfo,
    SeqDelta,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared


@dataclass(slots=True)
class _Sequence:
    request_id: str
    words: list[str]
    max_tokens: int
    prompt_tokens: int
    emitted: int = 0
    stops: list[str] = field(default_factory=list)


class EchoRunner:
    """Generates the prompt's words back, one word (= one token) per step."""

    def __init__(self, spec: WorkerSpec) -> None:
        self._options = spec.options
        self._context_length = int(spec.options.get("context_length", "256"))
        self._delay_s = float(spec.options.get("token_delay_s", "0"))
        crash = spec.options.get("crash_after_tokens")
        self._crash_after = int(crash) if crash else None
        self._running: dict[str, _Sequence] = {}
        self._total_emitted = 0

    def load(self) -> ModelInfo:
        if "fail_load" in self._options:
            raise ModelLoadError(self._options["fail_load"])
        return ModelInfo(context_length=self._context_length, dtype="float32", device="cpu")

    def warmup(self) -> None:
        pass

    def health(self) -> bool:
        return True

    def add_request(self, request: GenerateRequest) -> None:
        if "fail_requests" in self._options:
            raise InternalError("injected failure (fail_requests)")
        text = request.prompt or ""
        if request.messages:
            text = request.messages[-1].content
        words = text.split() or (["<empty>"] if request.prompt_token_ids else [])
        if not words:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        remaining = self._context_length - len(words)
        max_tokens = request.sampling.max_tokens or remaining
        if max_tokens > remaining:
            raise InvalidRequestError(
                f"prompt ({len(words)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"length ({self._context_length})",
                param="max_tokens",
            )
        self._running[request.request_id] = _Sequence(
            request.request_id, words, max_tokens, len(words), stops=request.sampling.stop
        )

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self._running)

    def num_running(self) -> int:
        return len(self._running)

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": 0}

    def step(self) -> list[SeqDelta]:
        if self._delay_s:
            time.sleep(self._delay_s)
        deltas = [self._advance(seq) for seq in list(self._running.values())]
        for delta in deltas:
            if delta.finish_reason is not None:
                self._running.pop(delta.request_id, None)
        return deltas

    def _advance(self, seq: _Sequence) -> SeqDelta:
        word = seq.words[seq.emitted % len(seq.words)]
        seq.emitted += 1
        self._total_emitted += 1
        if self._crash_after is not None and self._total_emitted > self._crash_after:
            os._exit(17)
        finish = None
        if word in seq.stops:
            finish, word = "stop", ""
        elif seq.emitted >= seq.max_tokens:
            finish = "length"
        prompt_tokens = seq.prompt_tokens if seq.emitted == 1 else 0
        text = word if seq.emitted == 1 or not word else " " + word
        return SeqDelta(seq.request_id, text, 1, finish, prompt_tokens)


class HashEmbeddingRunner:
    """Embeds each text as 8 floats derived from its sha256 (same text, same vector)."""

    dim = 8

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec

    def load(self) -> ModelInfo:
        return ModelInfo(context_length=512, dtype="float32", device="cpu", embedding_dim=self.dim)

    def warmup(self) -> None:
        pass

    def health(self) -> bool:
        return True

    def accepts(self) -> tuple[type, ...]:
        return (EmbedRequest,)

    def preprocess(self, request: InferRequest) -> Prepared:
        assert isinstance(request, EmbedRequest)
        texts = request.texts or [" ".join(map(str, ids)) for ids in request.token_ids or []]
        if not texts:
            raise InvalidRequestError("input is empty", param="input")
        return Prepared(request.request_id, [(len(t.split()), t) for t in texts])

    def forward(self, payloads: list[Any]) -> list[Any]:
        return [self._vector(text) for text in payloads]

    def postprocess(self, prepared: Prepared) -> EmbedResult:
        tokens = sum(length for length, _ in prepared.rows)
        data = b"".join(prepared.outputs)
        return EmbedResult(prepared.request_id, data, len(prepared.rows), self.dim, tokens)

    def _vector(self, text: str) -> bytes:
        digest = hashlib.sha256(text.encode()).digest()
        values = [b / 255.0 for b in digest[: self.dim]]
        return struct.pack(f"<{self.dim}f", *values)


def echo_runner(spec: WorkerSpec) -> EchoRunner:
    return EchoRunner(spec)


def hash_embedding_runner(spec: WorkerSpec) -> HashEmbeddingRunner:
    return HashEmbeddingRunner(spec)
