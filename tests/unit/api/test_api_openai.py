"""OpenAI routes, happy paths: raw HTTP and the official openai SDK."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
from api_helpers import chat_body, sse_payloads
from fastapi import FastAPI
from openai import AsyncOpenAI

from lmaas.testing.fakes import FakeEngineClient, fake_embedding

pytestmark = pytest.mark.anyio


async def test_models_list_and_get(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["fake-chat", "fake-completion", "fake-embed"]
    assert all(m["object"] == "model" and m["owned_by"] == "lmaas" for m in body["data"])
    one = await client.get("/v1/models/fake-chat")
    assert one.status_code == 200 and one.json()["id"] == "fake-chat"


async def test_chat_non_stream(client: httpx.AsyncClient, engine: FakeEngineClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(temperature=0, seed=3))
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello big world"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    sent = engine.last_generate
    assert sent is not None and sent.request_id == r.headers["x-request-id"]
    assert sent.sampling.temperature == 0.0 and sent.sampling.top_k == 1  # greedy


async def test_chat_stream_first_chunk_has_content_and_role(client: httpx.AsyncClient) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in r.headers
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    first = events[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "hello"}
    contents = [e["choices"][0]["delta"]["content"] for e in events[:-2]]
    assert "".join(contents) == "hello big world"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


async def test_stream_without_usage_and_max_tokens_length(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=2))
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a b c", "a b c"), (["a b"], "a b"), ([5, 6], "t5 t6"), ([[7]], "t7")],
)
async def test_completions_prompt_forms(
    client: httpx.AsyncClient, prompt: object, expected: str
) -> None:
    r = await client.post("/v1/completions", json={"model": "fake-completion", "prompt": prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == expected


async def test_completions_stop_and_ignore_eos(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "fake-chat", "prompt": "a b c d", "stop": [" c"]}
    )
    assert r.json()["choices"][0] == {
        "index": 0,
        "finish_reason": "stop",
        "text": "a b",
        "logprobs": None,
    }
    r = await client.post(
        "/v1/completions",
        json={"model": "fake-chat", "prompt": "x", "max_tokens": 5, "ignore_eos": True},
    )
    assert r.json()["usage"]["completion_tokens"] == 5


async def test_embeddings_float_and_base64(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": "fake-embed", "input": ["a", "b c"]})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "list" and body["model"] == "fake-embed"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == pytest.approx(fake_embedding("a", 8), rel=1e-6)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    r = await client.post(
        "/v1/embeddings", json={"model": "fake-embed", "input": "a", "encoding_format": "base64"}
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(fake_embedding("a", 8), rel=1e-6)


async def test_embeddings_token_ids_and_dimensions(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/embeddings", json={"model": "fake-embed", "input": [[1, 2], [3]], "dimensions": 4}
    )
    assert r.status_code == 200
    assert [len(d["embedding"]) for d in r.json()["data"]] == [4, 4]


def _sdk(app: FastAPI) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sdk.test")
    return AsyncOpenAI(api_key="x", base_url="http://sdk.test/v1", http_client=http)


async def test_openai_sdk_roundtrip(app: FastAPI) -> None:
    sdk = _sdk(app)
    models = await sdk.models.list()
    assert "fake-chat" in [m.id for m in models.data]
    chat = await sdk.chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "one two"}], max_tokens=8
    )
    assert chat.choices[0].message.content == "one two"
    assert chat.usage is not None and chat.usage.total_tokens == 4
    text = await sdk.completions.create(model="fake-completion", prompt="x y")
    assert text.choices[0].text == "x y"
    emb = await sdk.embeddings.create(model="fake-embed", input=["hi"])
    assert len(emb.data[0].embedding) == 8
    await sdk.close()


async def test_openai_sdk_stream_and_errors(app: FastAPI) -> None:
    import openai

    sdk = _sdk(app)
    stream = await sdk.chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.content == "one"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "x"}], n=17
        )
    assert "n" in str(info.value)
    await sdk.close()
