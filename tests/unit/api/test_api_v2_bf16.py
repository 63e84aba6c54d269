"""v2 inference of BF16 tensors: binary only (as in Triton), bit patterns passed through."""

from __future__ import annotations

import json
import struct

import httpx
import pytest

from lmaas.core.messages import InferRequest, TensorData, TensorRequest, TensorResult, TensorSpec
from lmaas.core.types import Task
from lmaas.testing.fakes import FakeEngineClient, FakeModelSpec

pytestmark = pytest.mark.anyio


async def _double_bf16(model: str, request: InferRequest) -> TensorResult:
    """A fake BF16 graph: ``y = 2 * x`` (exact in bfloat16: the exponent grows by one)."""
    assert isinstance(request, TensorRequest)
    (x,) = request.inputs
    count = len(x.data) // 2
    bits = struct.unpack(f"<{count}H", x.data)
    doubled = [b + (1 << 7) if b & 0x7F80 else b for b in bits]  # normal numbers only
    return TensorResult(
        request.request_id, [TensorData("y", "BF16", x.shape, struct.pack(f"<{count}H", *doubled))]
    )


@pytest.fixture
def engine() -> FakeEngineClient:
    spec = FakeModelSpec(
        "bf16",
        Task.TENSOR,
        inputs=[TensorSpec("x", "BF16", [-1, 2])],
        outputs=[TensorSpec("y", "BF16", [-1, 2])],
    )
    engine = FakeEngineClient([spec])
    engine.infer_handlers[TensorRequest] = _double_bf16
    return engine


def _bf16(value: float) -> int:
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return int(bits >> 16)


async def test_bf16_travels_binary_both_ways(
    client: httpx.AsyncClient, engine: FakeEngineClient
) -> None:
    meta = (await client.get("/v2/models/bf16")).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "BF16", "shape": [-1, 2]}]
    head = json.dumps({
        "inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 2],
                    "parameters": {"binary_data_size": 4}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    sent = struct.pack("<2H", _bf16(1.5), _bf16(-3.0))
    reply = await client.post(
        "/v2/models/bf16/infer",
        content=head + sent,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 200, reply.text
    size = int(reply.headers["inference-header-content-length"])
    (out,) = json.loads(reply.content[:size])["outputs"]
    assert out == {"name": "y", "datatype": "BF16", "shape": [1, 2],
                   "parameters": {"binary_data_size": 4}}  # fmt: skip
    assert reply.content[size:] == struct.pack("<2H", _bf16(3.0), _bf16(-6.0))
    forwarded = engine.last_infer
    assert isinstance(forwarded, TensorRequest)
    assert (forwarded.inputs[0].datatype, forwarded.inputs[0].data) == ("BF16", sent)


async def test_bf16_in_json_is_400_naming_the_binary_extension(
    client: httpx.AsyncClient, engine: FakeEngineClient
) -> None:
    body = {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 2], "data": [1, 2]}]}
    reply = await client.post("/v2/models/bf16/infer", json=body)
    assert reply.status_code == 400
    message = reply.json()["error"]
    assert "input 'x'" in message and "only as binary data" in message
    # Binary input but JSON output: refused before the model runs.
    head = json.dumps({
        "inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 2],
                    "parameters": {"binary_data_size": 4}}],
    }).encode()  # fmt: skip
    reply = await client.post(
        "/v2/models/bf16/infer",
        content=head + b"\0" * 4,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 400
    assert "output 'y' is BF16" in reply.json()["error"]
    assert engine.last_infer is None
