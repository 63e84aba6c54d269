"""Body cap, request ids, metrics, disconnects, deadlines, errors after a stream started."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from api_helpers import AsgiCall, chat_body, sse_payloads
from fastapi import FastAPI

from lmaas.testing.fakes import FakeEngineClient

pytestmark = pytest.mark.anyio

CAP = 64 * 1024


async def test_content_length_over_cap_is_413_without_reading(app: FastAPI) -> None:
    for path in ("/v1/chat/completions", "/v2/models/fake-embed/infer"):
        headers = [(b"content-length", str(CAP + 1).encode())]
        call = AsgiCall(app, path, b"x" * (CAP + 1), headers=headers)
        await call.run()
        assert call.status == 413 and call.num_body_reads == 0
        error = json.loads(call.body)["error"]
        assert isinstance(error, str) if path.startswith("/v2") else error["code"]


@pytest.mark.parametrize("value", [b"abc", b"-5", b"1e3"])
async def test_bad_content_length_is_400(app: FastAPI, value: bytes) -> None:
    call = AsgiCall(app, "/v1/chat/completions", b"{}", headers=[(b"content-length", value)])
    await call.run()
    assert call.status == 400 and call.num_body_reads == 0


async def test_chunked_body_over_cap_is_413(app: FastAPI, engine: FakeEngineClient) -> None:
    chunks = [b"x" * 16 * 1024] * 40
    headers = [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")]
    call = AsgiCall(app, "/v1/chat/completions", chunks, headers=headers)
    await call.run()
    assert call.status == 413
    assert call.num_body_reads <= CAP // (16 * 1024) + 1
    assert engine.num_generate_calls == 0


async def test_chunked_body_under_cap_works(client: httpx.AsyncClient) -> None:
    raw = json.dumps(chat_body()).encode()

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    headers = {"content-type": "application/json"}
    r = await client.post("/v1/chat/completions", content=gen(), headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


async def test_body_without_json_content_type(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=json.dumps(chat_body()).encode())
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


async def test_oversized_body_via_httpx(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", content=b"{" + b" " * CAP + b"}")
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


async def test_request_id_on_every_response(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/nowhere", headers={"x-request-id": "bad id\twith spaces"})
    assert r.status_code == 404 and r.headers["x-request-id"].startswith("req-")
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.headers["x-request-id"].startswith("req-")
    assert (await client.get("/health")).json() == {"status": "ok"}


async def test_metrics_endpoint(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat_body())
    await client.post("/v1/chat/completions", json=chat_body(stream=True))
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    route = 'route="/v1/chat/completions"'
    assert f'lmaas_http_requests_total{{model="fake-chat",{route},status="200"}} 2.0' in text
    assert 'lmaas_prompt_tokens_total{model="fake-chat"} 6.0' in text
    assert 'lmaas_generation_tokens_total{model="fake-chat"} 6.0' in text
    assert 'lmaas_time_to_first_token_seconds_count{model="fake-chat"} 2.0' in text
    assert 'lmaas_requests_in_flight{model="fake-chat"} 0.0' in text


async def test_error_mid_stream_is_one_final_event(make_app: Callable[..., FastAPI]) -> None:
    app = make_app(FakeEngineClient(fail_after_tokens=2))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/v1/chat/completions", json=chat_body("a b c d e", stream=True))
        assert r.status_code == 200
        events = sse_payloads(r.text)
        assert "[DONE]" not in events and "Traceback" not in r.text
        assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["a", " b"]
        assert events[-1]["error"]["type"] == "service_unavailable_error"
        assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
        r = await client.post("/v1/chat/completions", json=chat_body("a b c d e"))
        assert r.status_code == 503


async def _disconnect_after(call: AsgiCall, num_chunks: int) -> None:
    while sum(1 for m in call.sent if m.get("body")) < num_chunks:
        await asyncio.sleep(0.005)
    call.disconnect.set()


async def test_stream_disconnect_aborts_engine(make_app: Callable[..., FastAPI]) -> None:
    engine = FakeEngineClient(token_delay_s=0.02)
    app = make_app(engine)
    body = json.dumps(chat_body(" ".join(["w"] * 40), stream=True)).encode()
    call = AsgiCall(app, "/v1/chat/completions", body)
    watcher = asyncio.create_task(_disconnect_after(call, 3))
    await asyncio.wait_for(call.run(), timeout=2)
    await watcher
    assert call.status == 200
    assert engine.num_aborted == 1 and engine.num_completed == 0
    assert b"[DONE]" not in call.body


async def test_non_stream_disconnect_aborts_engine(make_app: Callable[..., FastAPI]) -> None:
    engine = FakeEngineClient(token_delay_s=0.02)
    app = make_app(engine)
    body = json.dumps(chat_body(" ".join(["w"] * 40))).encode()
    call = AsgiCall(app, "/v1/chat/completions", body)
    asyncio.get_running_loop().call_later(0.1, call.disconnect.set)
    await asyncio.wait_for(call.run(), timeout=2)
    assert engine.num_aborted == 1 and call.status is None


async def test_deadline_before_and_after_stream_start(make_app: Callable[..., FastAPI]) -> None:
    engine = FakeEngineClient(token_delay_s=0.1)
    app = make_app(engine, request_timeout_s=0.25)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        long_text = " ".join(["w"] * 20)
        r = await client.post("/v1/chat/completions", json=chat_body(long_text))
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        r = await client.post("/v1/chat/completions", json=chat_body(long_text, stream=True))
        assert r.status_code == 200
        events = sse_payloads(r.text)
        assert events[0]["choices"][0]["delta"]["content"] == "w"
        assert events[-1]["error"]["type"] == "timeout_error"
    assert engine.num_aborted == 2


async def test_lifespan_hook_runs(make_app: Callable[..., FastAPI]) -> None:
    from contextlib import asynccontextmanager

    seen: list[str] = []

    @asynccontextmanager
    async def hook() -> AsyncIterator[None]:
        seen.append("start")
        yield
        seen.append("stop")

    app = make_app(lifespan=hook)
    async with app.router.lifespan_context(app):
        assert seen == ["start"]
    assert seen == ["start", "stop"]


async def test_openapi_schema(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    assert "/v1/chat/completions" in r.json()["paths"]


def test_metrics_worker_state_one_hot() -> None:
    from lmaas.core.types import ModelState
    from lmaas.observability.metrics import Metrics

    metrics = Metrics()
    metrics.set_worker_state("m", ModelState.LOADING)
    metrics.set_worker_state("m", ModelState.READY)
    text = metrics.render()[0].decode()
    assert 'lmaas_worker_state{model="m",state="ready"} 1.0' in text
    assert 'lmaas_worker_state{model="m",state="loading"} 0.0' in text


def test_metrics_per_version_series_follow_the_deployment() -> None:
    from lmaas.observability.metrics import Metrics

    metrics = Metrics()
    metrics.set_engine_stats("m", {"running": 5})
    metrics.set_versions(
        "m",
        {"1": {"ready": 2}, "2": {"loading": 1}},
        {"1": {"running": 5}, "2": {"running": 0}},
    )
    text = metrics.render()[0].decode()
    assert 'lmaas_engine_stat{model="m",stat="running"} 5.0' in text
    assert 'lmaas_replicas{model="m",state="ready",version="1"} 2.0' in text
    assert 'lmaas_version_engine_stat{model="m",stat="running",version="1"} 5.0' in text
    # Version 1 left (its replicas drain), version 2 is ready: 1's series go.
    metrics.set_versions("m", {"2": {"ready": 1}}, {"2": {"running": 1}})
    text = metrics.render()[0].decode()
    assert 'version="1"' not in text and 'lmaas_replicas{model="m",state="loading"' not in text
    assert 'lmaas_replicas{model="m",state="ready",version="2"} 1.0' in text
    metrics.set_engine_stats("other", {"running": 1})
    metrics.forget_model("m")
    text = metrics.render()[0].decode()
    assert 'model="m",stat=' not in text and 'version="2"' not in text
    assert 'lmaas_worker_state{model="m",state="stopped"} 1.0' in text
    assert 'lmaas_engine_stat{model="other",stat="running"} 1.0' in text
