"""n > 1, logprobs, logit_bias / penalties / response_format through the OpenAI routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from api_helpers import chat_body, sse_payloads
from fastapi import FastAPI
from openai import AsyncOpenAI

from lmaas.core.messages import GenerateRequest, SeqDelta, TokenLogprob
from lmaas.testing.fakes import FakeEngineClient

pytestmark = pytest.mark.anyio


def _sdk(app: FastAPI) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sdk.test")
    return AsyncOpenAI(api_key="x", base_url="http://sdk.test/v1", http_client=http)


async def test_sdk_chat_n_and_logprobs(app: FastAPI) -> None:
    sdk = _sdk(app)
    chat = await sdk.chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "one two three"}],
        n=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert all(c.message.content == "one two three" for c in chat.choices)
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 9)
    logprobs = chat.choices[1].logprobs
    assert logprobs is not None and logprobs.content is not None
    first = logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("one", pytest.approx(-0.1), list(b"one"))
    assert [t.token for t in first.top_logprobs] == ["alt0", "alt1"]
    assert [t.token for t in logprobs.content] == ["one", " two", " three"]
    await sdk.close()


async def test_sdk_chat_stream_n(app: FastAPI) -> None:
    sdk = _sdk(app)
    stream = await sdk.chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "a b"}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
    )
    texts = {0: "", 1: ""}
    roles = {0: 0, 1: 0}
    finish = {}
    num_logprobs = 0
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] += choice.delta.role is not None
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
            if choice.logprobs and choice.logprobs.content:
                num_logprobs += len(choice.logprobs.content)
                assert choice.logprobs.content[0].top_logprobs == []
    assert texts == {0: "a b", 1: "a b"}
    assert roles == {0: 1, 1: 1}
    assert finish == {0: "stop", 1: "stop"}
    assert num_logprobs == 4
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 4)
    await sdk.close()


async def test_sdk_completions_logprobs_and_n(app: FastAPI) -> None:
    sdk = _sdk(app)
    text = await sdk.completions.create(
        model="fake-completion", prompt="x yy zzz", logprobs=2, n=2, best_of=2
    )
    assert [c.index for c in text.choices] == [0, 1]
    logprobs = text.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["x", " yy", " zzz"]
    assert logprobs.token_logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert logprobs.text_offset == [0, 1, 4]
    assert logprobs.top_logprobs is not None
    assert list(logprobs.top_logprobs[0]) == ["alt0", "alt1"]
    stream = await sdk.completions.create(
        model="fake-completion", prompt="x yy", logprobs=0, stream=True
    )
    offsets: list[int] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.text_offset:
                offsets += choice.logprobs.text_offset
    assert offsets == [0, 1]
    await sdk.close()


async def test_parameters_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngineClient
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat_body(
        logit_bias={"17": -100, "5": 2.5},
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        min_p=0.1,
        top_k=40,
        seed=3,
        max_completion_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert engine.last_generate is not None
    sampling = engine.last_generate.sampling
    assert sampling.logit_bias == {17: -100.0, 5: 2.5}
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.25)
    assert (sampling.repetition_penalty, sampling.min_p, sampling.top_k) == (1.2, 0.1, 40)
    assert sampling.max_tokens == 4 and sampling.logprobs is None and sampling.n == 1
    assert sampling.response_format is not None
    assert json.loads(sampling.response_format)["json_schema"]["schema"] == schema
    r = await client.post("/v1/chat/completions", json=chat_body(response_format={"type": "text"}))
    assert r.status_code == 200
    assert engine.last_generate.sampling.response_format is None
    body = {"model": "fake-completion", "prompt": "x", "response_format": {"type": "json_object"}}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert json.loads(engine.last_generate.sampling.response_format or "") == {
        "type": "json_object"
    }


async def test_greedy_drops_min_p(client: httpx.AsyncClient, engine: FakeEngineClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(temperature=0, min_p=0.5))
    assert r.status_code == 200
    assert engine.last_generate is not None
    assert engine.last_generate.sampling.min_p == 0.0


async def test_raw_stream_shapes_with_n(client: httpx.AsyncClient) -> None:
    body = chat_body("p q", n=2, stream=True, logprobs=True, top_logprobs=1)
    r = await client.post("/v1/chat/completions", json=body)
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    entry = chunks[0]["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}


class _Unfinished(FakeEngineClient):
    """An engine whose stream ends without finish reasons (closing chunks must be added)."""

    async def _generate(self, model: str, request: GenerateRequest) -> AsyncIterator[SeqDelta]:
        for index in range(request.sampling.n):
            logprobs = [TokenLogprob("t", -1.0, [])]
            yield SeqDelta(request.request_id, "t", 1, None, 1, index=index, logprobs=logprobs)


async def test_stream_closes_every_choice(make_app: Callable[..., FastAPI]) -> None:
    app = make_app(_Unfinished())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = {"model": "fake-completion", "prompt": "x", "n": 2, "stream": True, "logprobs": 0}
        r = await client.post("/v1/completions", json=body)
    chunks = sse_payloads(r.text)[:-1]
    closing = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in closing) == [0, 1]
    assert all(c["logprobs"]["tokens"] == [] for c in closing)
