"""The error contract: every status with its envelope, on both route families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from api_helpers import chat_body, post_json
from fastapi import FastAPI

from lmaas.core import errors as e
from lmaas.testing.fakes import FakeEngineClient

pytestmark = pytest.mark.anyio

V2_INFER = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}


def assert_openai_error(r: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    assert r.headers["x-request-id"]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if type_ is not None:
        assert error["type"] == type_
    return dict(error)


def assert_v2_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and r.headers["x-request-id"]
    message = r.json()["error"]
    assert isinstance(message, str)
    return message


CONTRACT = [
    (e.InvalidRequestError("bad"), 400, "invalid_request_error"),
    (e.PayloadTooLargeError("big"), 413, "invalid_request_error"),
    (e.AuthenticationError("who"), 401, "authentication_error"),
    (e.PermissionDeniedError("no"), 403, "permission_error"),
    (e.ModelNotFoundError("gone"), 404, "not_found_error"),
    (e.RateLimitError("slow", retry_after_s=2.5), 429, "rate_limit_error"),
    (e.NotSupportedError("later"), 501, "not_supported_error"),
    (e.OverloadedError("busy"), 503, "service_unavailable_error"),
    (e.DrainingError("bye"), 503, "service_unavailable_error"),
    (e.WorkerCrashedError("crash"), 503, "service_unavailable_error"),
    (e.DeadlineExceededError("late"), 504, "timeout_error"),
    (e.InternalError("secret detail"), 500, "server_error"),
    (RuntimeError("secret detail"), 500, "server_error"),
]


@pytest.mark.parametrize(("error", "status", "type_"), CONTRACT)
async def test_error_contract_openai(
    make_app: Callable[..., FastAPI], error: Exception, status: int, type_: str
) -> None:
    app = make_app(FakeEngineClient(error=error))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    ) as client:
        for url, body in [
            ("/v1/chat/completions", chat_body()),
            ("/v1/chat/completions", chat_body(stream=True)),
            ("/v1/embeddings", {"model": "fake-embed", "input": "x"}),
        ]:
            r = await client.post(url, json=body)
            err = assert_openai_error(r, status, type_)
            if status in (429, 503):
                assert int(r.headers["retry-after"]) >= 1
            if status == 500:
                assert "secret" not in r.text
                assert err["message"] == f"internal error (request id {r.headers['x-request-id']})"
        r = await client.post("/v2/models/fake-embed/infer", json=V2_INFER)
        assert_v2_error(r, status)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake-chat"}, "messages"),
        (chat_body(temperature=float("nan")), "temperature"),
        (chat_body(temperature=3), "temperature"),
        (chat_body(top_p=0), "top_p"),
        (chat_body(top_k=-2), "top_k"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(max_tokens=2**70), "max_tokens"),
        (chat_body(max_tokens="lots"), "max_tokens"),
        (chat_body(stop=["x"] * 9), "stop"),
        (chat_body(stop="y" * 257), "stop"),
        (chat_body(n=17), "n"),
        (chat_body(n=0), "n"),
        (chat_body(top_logprobs=2), "top_logprobs"),
        (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat_body(logit_bias={"x": 5}), "logit_bias"),
        (chat_body(logit_bias={"1": 101}), "logit_bias"),
        (chat_body(presence_penalty=2.5), "presence_penalty"),
        (chat_body(frequency_penalty=-3), "frequency_penalty"),
        (chat_body(repetition_penalty=0), "repetition_penalty"),
        (chat_body(min_p=1.5), "min_p"),
        (chat_body(response_format={"type": "xml"}), "response_format"),
        (chat_body(response_format={"type": "json_schema"}), "response_format"),
        (chat_body(tools=[{"type": "function"}]), "tools"),
        (chat_body(chat_template="{{ 7*7 }}"), "chat_template"),
        (chat_body(max_tokens=1000), "max_tokens"),
        (chat_body(min_tokens=5, max_tokens=2), "min_tokens"),
        ({"model": "fake-chat", "messages": []}, "messages"),
        ({"model": "fake-chat", "messages": [{"role": "wizard", "content": "x"}]}, None),
        (
            {
                "model": "fake-chat",
                "messages": [{"role": "user", "content": [{"type": "image_url", "x": 1}]}],
            },
            "messages[0].content[0]",
        ),
        ({"model": "fake-completion", "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "fake-embed", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
async def test_chat_invalid_requests(
    client: httpx.AsyncClient, engine: FakeEngineClient, body: dict[str, Any], param: str | None
) -> None:
    r = await post_json(client, "/v1/chat/completions", body)
    err = assert_openai_error(r, 400, "invalid_request_error")
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)
        assert param.split("[")[0] in err["message"] or "model" in err["message"]
    assert engine.num_generate_calls == 0


async def test_specific_messages(client: httpx.AsyncClient) -> None:
    body = {"model": "fake-completion", "prompt": "x", "n": 2, "best_of": 3}
    r = await client.post("/v1/completions", json=body)
    assert r.json()["error"]["message"] == "best_of (3) other than n (2) is not supported"
    body = {"model": "fake-completion", "prompt": ["a", "b"]}
    r = await client.post("/v1/completions", json=body)
    assert r.json()["error"]["message"] == "batch prompts are not supported"
    body = {"model": "fake-completion", "messages": [{"role": "user", "content": "x"}]}
    r = await client.post("/v1/chat/completions", json=body)
    assert "completion model" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fake-completion", "prompt": ""},
        {"model": "fake-completion", "prompt": []},
        {"model": "fake-completion", "prompt": "x", "echo": True},
        {"model": "fake-completion", "prompt": "x", "best_of": 2},
        {"model": "fake-completion", "prompt": "x", "suffix": "z"},
        {"model": "fake-completion", "prompt": "x", "logprobs": 6},
        {"model": "fake-completion", "prompt": [-1]},
        {"model": "fake-embed", "prompt": "x"},
        {"model": "fake-chat", "prompt": "x", "temperature": float("inf")},
    ],
)
async def test_completion_invalid_requests(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert_openai_error(await post_json(client, "/v1/completions", body), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fake-embed", "input": []},
        {"model": "fake-embed", "input": ["x"] * 2049},
        {"model": "fake-embed", "input": [[]]},
        {"model": "fake-embed", "input": "x", "encoding_format": "int8"},
        {"model": "fake-embed", "input": "x", "dimensions": 9},
        {"model": "fake-chat", "input": "x"},
        {"model": "fake-embed", "input": 5},
    ],
)
async def test_embedding_invalid_requests(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert_openai_error(await post_json(client, "/v1/embeddings", body), 400)


async def test_context_overflow_is_400(client: httpx.AsyncClient) -> None:
    long_text = " ".join(["w"] * 70)
    r = await client.post("/v1/chat/completions", json=chat_body(long_text))
    err = assert_openai_error(r, 400)
    assert "context length" in err["message"]
    r = await client.post("/v1/chat/completions", json=chat_body(long_text, stream=True))
    assert_openai_error(r, 400)


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "fake-chat", "messages": [', b"{} trailing", b"\xff\xfe\x00", b"[" * 50_000],
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    headers = {"content-type": "application/json"}
    r = await client.post("/v1/chat/completions", content=raw, headers=headers)
    assert_openai_error(r, 400)
    r = await client.post("/v2/models/fake-embed/infer", content=raw, headers=headers)
    assert_v2_error(r, 400)
    assert (await client.get("/v2/health/live")).status_code == 200


async def test_lone_surrogate_is_400(client: httpx.AsyncClient) -> None:
    raw = b'{"model": "fake-chat", "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    r = await client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400)


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nothing"), 404, "not_found_error")
    assert_v2_error(await client.get("/v2/nothing/here"), 404)
    assert_openai_error(await client.get("/v1/chat/completions"), 405)
    assert_openai_error(await client.get("/v1/models/nope"), 404)
    assert_v2_error(await client.get("/v2/models/nope"), 404)
    assert_v2_error(await client.get("/v2/models/nope/ready"), 404)


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(some_vendor_flag=True, user="u"))
    assert r.status_code == 200
