"""The real server with real worker processes, through the clients users have."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.integration.serverproc import ServerProcess


def _client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_are_listed(server: ServerProcess) -> None:
    ids = {m.id for m in _client(server).models.list()}
    assert ids == {"tiny-chat", "tiny-embed"}


def test_chat_with_the_openai_sdk(server: ServerProcess) -> None:
    reply = _client(server).chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streaming_chat_matches_the_non_streamed_text(server: ServerProcess) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(
        model="tiny-chat",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=messages,
            max_tokens=10,
            temperature=0,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_and_seeded_sampling(server: ServerProcess) -> None:
    client = _client(server)
    args = {
        "model": "tiny-chat",
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "seed": 7,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    first = client.completions.create(**args)  # type: ignore[call-overload]
    second = client.completions.create(**args)  # type: ignore[call-overload]
    assert first.choices[0].text == second.choices[0].text
    assert first.usage is not None and first.usage.completion_tokens == 8


def test_embeddings_with_the_openai_sdk(server: ServerProcess) -> None:
    client = _client(server)
    floats = client.embeddings.create(
        model="tiny-embed", input=["hello", "a longer sentence"], encoding_format="float"
    )
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape[0] == 2
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    b64 = client.embeddings.create(model="tiny-embed", input=["hello", "a longer sentence"])
    assert np.allclose(np.array([d.embedding for d in b64.data]), vectors, atol=1e-6)
    short = client.embeddings.create(model="tiny-embed", input="hello", dimensions=16)
    assert len(short.data[0].embedding) == 16
    with pytest.raises(BadRequestError):
        client.embeddings.create(model="tiny-embed", input="hello", dimensions=3)


def test_tritonclient_metadata_and_infer(server: ServerProcess) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.base_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-embed")
    meta = client.get_model_metadata("tiny-embed")
    assert meta["name"] == "tiny-embed"
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello", b"world"], dtype=object))
    out = client.infer("tiny-embed", [text]).as_numpy("embedding")
    assert out is not None and out.shape[0] == 2 and out.dtype == np.float32
    prompt = triton.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Hello"], dtype=object))
    generated = client.infer("tiny-chat", [prompt]).as_numpy("text_output")
    assert generated is not None and generated.shape == (1,)


def test_bad_inputs_get_their_status_and_the_server_stays_live(server: ServerProcess) -> None:
    url = server.base_url
    chat = f"{url}/v1/chat/completions"
    cases = [
        (httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400),
        (httpx.post(chat, json={"model": "tiny-chat", "messages": "hi"}), 400),
        (httpx.post(chat, json={"model": "tiny-chat", "messages": []}), 400),
        (
            httpx.post(
                chat, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            ),
            404,
        ),
        (
            httpx.post(
                chat,
                json={
                    "model": "tiny-chat",
                    "max_tokens": 10**6,
                    "messages": [{"role": "user", "content": "x"}],
                },
            ),
            400,
        ),
        (
            httpx.post(
                chat,
                json={
                    "model": "tiny-chat",
                    "n": 17,
                    "messages": [{"role": "user", "content": "x"}],
                },
            ),
            400,
        ),
        (
            httpx.post(
                chat, content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}
            ),
            413,
        ),
        (httpx.post(f"{url}/v1/embeddings", json={"model": "../../etc/passwd", "input": "x"}), 404),
        (httpx.post(f"{url}/v2/models/nope/infer", json={"inputs": []}), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert "Traceback" not in response.text
        assert "x-request-id" in response.headers
        body = response.json()
        assert "error" in body
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).models.retrieve("nope")


def test_gateway_never_loads_torch(server: ServerProcess) -> None:
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps


def test_metrics_count_requests(server: ServerProcess) -> None:
    httpx.get(f"{server.base_url}/v1/models")
    text = httpx.get(f"{server.base_url}/metrics").text
    assert "http_requests_total" in text or "lmaas_http_requests_total" in text
    assert "worker_state" in text


def test_sse_stream_is_well_formed(server: ServerProcess) -> None:
    body = {
        "model": "tiny-chat",
        "prompt": "Hi",
        "max_tokens": 4,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["choices"][0]["text"] != "" or first["choices"][0]["finish_reason"]
