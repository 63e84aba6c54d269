"""Open Inference Protocol v2 routes over the fake engine."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from api_helpers import post_json
from fastapi import FastAPI

from lmaas.core.types import ModelState
from lmaas.testing.fakes import FakeEngineClient, fake_embedding

pytestmark = pytest.mark.anyio

INFER = "/v2/models/fake-embed/infer"


def text_input(data: Any, shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": "text", "datatype": "BYTES", "shape": shape or [2], "data": data}


async def test_server_metadata_and_health(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "lmaas" and "binary_tensor_data" in meta["extensions"]
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/models/fake-chat/ready")).status_code == 200
    assert (await client.get("/v2/models/fake-chat/versions/1/ready")).status_code == 200


async def test_readiness_follows_engine_and_draining(make_app: Callable[..., FastAPI]) -> None:
    engine = FakeEngineClient()
    draining = [False]
    app = make_app(engine, is_draining=lambda: draining[0])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        engine.set_state("fake-chat", ModelState.LOADING)
        r = await client.get("/v2/health/ready")
        assert r.status_code == 503 and isinstance(r.json()["error"], str)
        assert "retry-after" in r.headers
        assert (await client.get("/v2/models/fake-chat/ready")).status_code == 503
        assert (await client.get("/v2/models/fake-embed/ready")).status_code == 200
        engine.set_state("fake-chat", ModelState.READY)
        draining[0] = True
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_model_metadata_and_config(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/fake-embed")).json()
    assert meta["platform"] == "lmaas_embedding" and meta["versions"] == ["1"]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 8]}]
    meta = (await client.get("/v2/models/fake-chat/versions/1")).json()
    assert meta["inputs"][0] == {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    assert (await client.get("/v2/models/fake-chat/versions/9")).status_code == 404
    config = (await client.get("/v2/models/fake-embed/config")).json()
    assert config["input"][0]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize(
    ("data", "shape"), [(["a", "b"], [2]), ([["a"], ["b"]], [2, 1]), (["a", "b"], [2, 1])]
)
async def test_embedding_infer_json(client: httpx.AsyncClient, data: Any, shape: list[int]) -> None:
    body = {"id": "my-id", "inputs": [text_input(data, shape)]}
    r = await client.post(INFER, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "my-id" and out["model_name"] == "fake-embed"
    (emb,) = out["outputs"]
    assert emb["name"] == "embedding" and emb["datatype"] == "FP32" and emb["shape"] == [2, 8]
    assert emb["data"][:8] == pytest.approx(fake_embedding("a", 8), rel=1e-6)


async def test_embedding_infer_binary_both_ways(client: httpx.AsyncClient) -> None:
    texts = [b"a", b"hello"]
    blob = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    tensor = {"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {}}
    tensor["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps(
        {
            "inputs": [tensor],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = await client.post(
        INFER,
        content=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    size = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:size])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 64
    values = struct.unpack("<16f", r.content[size:])
    assert list(values[8:]) == pytest.approx(fake_embedding("hello", 8), rel=1e-6)


async def test_generation_infer(client: httpx.AsyncClient) -> None:
    body = {
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["a b c d"]},
            {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]},
        ],
        "parameters": {"temperature": 0},
    }
    r = await client.post("/v2/models/fake-chat/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out == {"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["a b"]}


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [text_input(["a", "b"]) | {"datatype": "STRING"}]},
        {"inputs": [text_input(["a", "b"], [-2])]},
        {"inputs": [text_input(["a", "b"], [1.5])]},
        {"inputs": [text_input(["a", "b"], [3])]},
        {"inputs": [text_input(["a", "b"], [2**40, 2**40])]},
        {"inputs": []},
        {"inputs": [text_input(["a", "b"]) | {"name": "other"}]},
        {"inputs": [text_input(["a", "b"]), text_input(["a", "b"]) | {"name": "extra"}]},
        {"inputs": [text_input([1, 2])]},
        {"inputs": [text_input(["a", "b"])], "outputs": [{"name": "nope"}]},
        {"inputs": [text_input(["a", "b"])], "outputs": [{"name": "embedding"}] * 2},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]},
        [1, 2],
    ],
)
async def test_v2_tensor_validation(
    client: httpx.AsyncClient, engine: FakeEngineClient, body: Any
) -> None:
    r = await post_json(client, INFER, body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str)
    assert engine.num_embed_calls == 0


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]},
        {
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "parameters": {"temperature": 9},
        },
    ],
)
async def test_v2_generation_validation(client: httpx.AsyncClient, body: Any) -> None:
    r = await client.post("/v2/models/fake-chat/infer", json=body)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


async def test_v2_unknown_model_and_bad_header(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/models/nope/infer", json={"inputs": [text_input(["a", "b"])]})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = await client.post(INFER, content=b"{}", headers={"Inference-Header-Content-Length": "999"})
    assert r.status_code == 400
