"""``lmaas bench serve``: an HTTP load generator for any OpenAI-compatible server.

One client on one event loop (HTTP/1.1, as many keep-alive connections as the concurrency; the
cheap :class:`~lmaas.bench.rawclient.RawStreamClient` by default, ``httpx`` on request or for
``https``, see :mod:`lmaas.bench.transport`) sends streamed completion requests with
``ignore_eos`` and ``max_tokens = output_len``, at a fixed concurrency or with Poisson arrivals,
and times every SSE chunk. The metric definitions
are those of ``vllm bench serve`` (see :mod:`lmaas.bench.metrics`), so numbers taken here
compare with numbers taken by vLLM's client against the same server.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter, process_time
from typing import Literal
from urllib.parse import urlsplit

from lmaas.bench.metrics import PERCENTILES, Aggregate, RequestOutcome, aggregate
from lmaas.bench.prompts import (
    HFTokenizer,
    Prompt,
    arrival_offsets,
    token_id_prompts,
    tokenized_prompts,
    word_prompts,
)
from lmaas.bench.rawclient import RawStreamClient
from lmaas.bench.sse import StreamTimer
from lmaas.bench.transport import HttpxStreamClient, StreamClient, StreamFailure
from lmaas.core.errors import InvalidRequestError

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
"""The endpoints the load generator speaks."""

ClientKind = Literal["raw", "httpx"]
CLIENTS: tuple[ClientKind, ...] = ("raw", "httpx")
"""``raw``: :class:`~lmaas.bench.rawclient.RawStreamClient` (http only, a few times less CPU);
``httpx``: :class:`~lmaas.bench.transport.HttpxStreamClient` (the reference; https too)."""

_MAX_ERROR_CHARS = 500


@dataclass(slots=True, frozen=True)
class BenchConfig:
    """One benchmark run.

    Raises:
        InvalidRequestError: from the constructor, for values that cannot make a run.
    """

    base_url: str
    """Server root, e.g. ``http://127.0.0.1:8000`` (no ``/v1``)."""
    model: str
    """The ``model`` field of every request."""
    endpoint: str = "/v1/completions"
    """``/v1/completions`` or ``/v1/chat/completions``."""
    num_prompts: int = 64
    input_len: int = 128
    """Prompt length in tokens (exact with ids or a tokenizer, in words otherwise)."""
    output_len: int = 128
    """``max_tokens`` of every request; with ``ignore_eos`` every request generates this many."""
    max_concurrency: int | None = None
    """Most requests in flight at once; None means no limit."""
    request_rate: float = math.inf
    """Requests per second (Poisson arrivals when ``burstiness`` is 1); inf sends all at once."""
    burstiness: float = 1.0
    """Shape of the gamma-distributed gaps: 1 is Poisson, below 1 burstier, above 1 steadier."""
    seed: int = 0
    """Seeds the prompts and the arrival times."""
    tokenizer: Path | None = None
    """A directory with ``tokenizer.json``: text prompts of exactly ``input_len`` tokens."""
    vocab_size: int = 32000
    """Without a tokenizer, /v1/completions prompts are random ids in ``[0, vocab_size)``."""
    warmup: int = 0
    """Requests sent (and not measured) before the run."""
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0
    """Read timeout of one request."""
    extra_body: dict[str, object] = field(default_factory=dict)
    """Merged into every request body (for a peer's own parameters)."""
    percentiles: tuple[float, ...] = PERCENTILES
    client: ClientKind = "raw"
    """Which HTTP client sends the requests (see :data:`CLIENTS`)."""

    def __post_init__(self) -> None:
        self._check_url()
        if self.endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"endpoint {self.endpoint!r} is not one of {', '.join(ENDPOINTS)}",
                param="endpoint",
            )
        counts = {"num_prompts": self.num_prompts, "input_len": self.input_len}
        counts |= {"output_len": self.output_len, "vocab_size": self.vocab_size}
        for name, value in counts.items():
            if value < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {value}", param=name)
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise InvalidRequestError(
                f"max_concurrency must be at least 1, got {self.max_concurrency}",
                param="max_concurrency",
            )
        if self.request_rate <= 0 or self.burstiness <= 0 or self.warmup < 0:
            raise InvalidRequestError(
                f"request_rate ({self.request_rate}) and burstiness ({self.burstiness}) must "
                f"be positive and warmup ({self.warmup}) not negative"
            )

    def _check_url(self) -> None:
        if self.client not in CLIENTS:
            raise InvalidRequestError(
                f"client {self.client!r} is not one of {', '.join(CLIENTS)}", param="client"
            )
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise InvalidRequestError(
                f"base_url must be http://host[:port] or https://..., got {self.base_url!r}",
                param="base_url",
            )
        if url.scheme == "https" and self.client == "raw":
            raise InvalidRequestError(
                f"the raw client speaks plain http only; for {self.base_url} use the httpx "
                "client (--client httpx)",
                param="client",
            )


@dataclass(slots=True, frozen=True)
class BenchResult:
    """The outcome of :func:`run_benchmark`."""

    config: BenchConfig
    started_at: datetime
    summary: Aggregate
    outcomes: list[RequestOutcome]
    client_cpu_s: float = 0.0
    """CPU time of this process (``time.process_time``) during the measured requests: what
    the load generator itself took from the machine."""


OnOutcome = Callable[[RequestOutcome], None]


async def run_benchmark(config: BenchConfig, on_outcome: OnOutcome | None = None) -> BenchResult:
    """Run ``config`` against its server and aggregate the measurements.

    Failed requests (HTTP errors, error events, broken streams) are counted, not raised.

    Args:
        config: What to send, where, and how fast.
        on_outcome: Called after each measured request (for a progress display).

    Raises:
        InvalidRequestError: the tokenizer cannot be loaded.
    """
    tokenizer = HFTokenizer.load(config.tokenizer) if config.tokenizer else None
    prompts = make_prompts(config, config.num_prompts, config.seed, tokenizer)
    client = open_client(config)
    try:
        sender = _Sender(client, config, tokenizer)
        if config.warmup:
            warm = make_prompts(config, config.warmup, config.seed + 1, tokenizer)
            await sender.run_all(warm, [0.0] * len(warm), None)
        offsets = arrival_offsets(
            config.num_prompts, config.request_rate, config.burstiness, config.seed
        )
        started_at = datetime.now(UTC)
        start_s, start_cpu_s = perf_counter(), process_time()
        outcomes = await sender.run_all(prompts, offsets, on_outcome)
        duration_s, cpu_s = perf_counter() - start_s, process_time() - start_cpu_s
    finally:
        await client.aclose()
    summary = aggregate(outcomes, duration_s, config.percentiles)
    return BenchResult(config, started_at, summary, outcomes, cpu_s)


def open_client(config: BenchConfig) -> StreamClient:
    """The client ``config.client`` names, for ``config.endpoint`` of ``config.base_url``."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    if config.client == "httpx":
        limit = config.max_concurrency or config.num_prompts
        return HttpxStreamClient(config.base_url, config.endpoint, headers, config.timeout_s, limit)
    return RawStreamClient(config.base_url, config.endpoint, headers, config.timeout_s)


def make_prompts(
    config: BenchConfig, count: int, seed: int, tokenizer: HFTokenizer | None
) -> list[Prompt]:
    """Exact-length prompts where possible: tokenizer text, else ids (completions), else words."""
    if tokenizer is not None:
        return tokenized_prompts(count, config.input_len, seed, tokenizer)
    if config.endpoint == "/v1/completions":
        return token_id_prompts(count, config.input_len, config.vocab_size, seed)
    return word_prompts(count, config.input_len, seed)


def request_body(config: BenchConfig, prompt: Prompt) -> dict[str, object]:
    """The JSON body of one streamed request."""
    body: dict[str, object] = {
        "model": config.model,
        "max_tokens": config.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt.text or ""}]
    else:
        body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
    body.update(config.extra_body)
    return body


@dataclass(slots=True)
class _Sender:
    client: StreamClient
    config: BenchConfig
    tokenizer: HFTokenizer | None

    async def run_all(
        self, prompts: Sequence[Prompt], offsets: Sequence[float], on_outcome: OnOutcome | None
    ) -> list[RequestOutcome]:
        limit = self.config.max_concurrency
        gate = asyncio.Semaphore(limit) if limit else None
        start_s = perf_counter()

        async def one(prompt: Prompt, offset_s: float) -> RequestOutcome:
            delay_s = start_s + offset_s - perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if gate is None:
                outcome = await self.send(prompt)
            else:
                async with gate:
                    outcome = await self.send(prompt)
            if on_outcome is not None:
                on_outcome(outcome)
            return outcome

        return list(
            await asyncio.gather(*(one(p, t) for p, t in zip(prompts, offsets, strict=True)))
        )

    async def send(self, prompt: Prompt) -> RequestOutcome:
        outcome = RequestOutcome(start_s=perf_counter())
        outcome.prompt_tokens = prompt.num_tokens if prompt.exact else 0
        timer = StreamTimer(outcome)
        body = json.dumps(request_body(self.config, prompt), separators=(",", ":"))
        try:
            await self.client.stream(body.encode(), timer)
        except (ValueError, StreamFailure) as exc:
            outcome.error = _short(str(exc))
            return outcome
        self._finish(prompt, timer)
        return outcome

    def _finish(self, prompt: Prompt, timer: StreamTimer) -> None:
        outcome = timer.outcome
        if timer.num_chunks == 0:
            outcome.error = "the stream ended without a chunk carrying choices"
            return
        if not timer.usage_seen:
            # No usage chunk: count the text like vLLM does, or fall back to one per chunk.
            tokens = self.tokenizer.encode_ids(timer.text) if self.tokenizer else None
            outcome.output_tokens = len(tokens) if tokens is not None else timer.num_chunks
        if outcome.prompt_tokens == 0 and not prompt.exact:
            outcome.prompt_tokens = prompt.num_tokens
        outcome.success = True


def _short(message: str) -> str:
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + "…"
