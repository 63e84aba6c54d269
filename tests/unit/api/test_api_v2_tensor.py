"""v2 inference of tensor models over the fake engine: tensors in, tensors out."""

from __future__ import annotations

import json
import struct

import httpx
import pytest

from lmaas.core.messages import InferRequest, TensorData, TensorRequest, TensorResult
from lmaas.core.types import Task
from lmaas.testing.fakes import FakeEngineClient, FakeModelSpec

pytestmark = pytest.mark.anyio


async def _run_graph(model: str, request: InferRequest) -> TensorResult:
    """A fake graph: ``ids = x.sum(-1)`` as INT64 and one BYTES tag per row."""
    assert isinstance(request, TensorRequest)
    x = next(t for t in request.inputs if t.name == "x")
    rows = x.shape[0]
    values = struct.unpack(f"<{rows * 2}f", x.data)
    ids = [int(sum(values[i * 2 : i * 2 + 2])) for i in range(rows)]
    outputs = [
        TensorData("ids", "INT64", [rows], struct.pack(f"<{rows}q", *ids)),
        TensorData("tag", "BYTES", [rows], items=[b"row%d" % i for i in range(rows)]),
    ]
    return TensorResult(request.request_id, outputs)


@pytest.fixture
def engine() -> FakeEngineClient:
    engine = FakeEngineClient([FakeModelSpec("graph", Task.TENSOR)])
    engine.infer_handlers[TensorRequest] = _run_graph
    return engine


async def test_json_in_json_out_with_int64_and_bytes(
    client: httpx.AsyncClient, engine: FakeEngineClient
) -> None:
    body = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4.5]]},
        {"name": "k", "datatype": "INT8", "shape": [2], "data": [-3, 7]},
    ]}  # fmt: skip
    reply = await client.post("/v2/models/graph/infer", json=body)
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["ids"] == {"name": "ids", "datatype": "INT64", "shape": [2], "data": [3, 7]}
    assert outputs["tag"]["data"] == ["row0", "row1"]
    sent = engine.last_infer
    assert isinstance(sent, TensorRequest) and sent.outputs is None
    k = next(t for t in sent.inputs if t.name == "k")
    assert (k.datatype, k.data) == ("INT8", struct.pack("<2b", -3, 7))


async def test_binary_inputs_and_outputs(client: httpx.AsyncClient) -> None:
    head = json.dumps({
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2],
             "parameters": {"binary_data_size": 8}},
            {"name": "k", "datatype": "INT8", "shape": [1], "data": [0]},
        ],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    reply = await client.post(
        "/v2/models/graph/infer",
        content=head + struct.pack("<2f", 2.0, 2.5),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 200, reply.text
    size = int(reply.headers["inference-header-content-length"])
    header = json.loads(reply.content[:size])
    assert [o["name"] for o in header["outputs"]] == ["ids", "tag"]
    assert reply.content[size : size + 8] == struct.pack("<q", 4)
    assert reply.content[size + 8 :] == struct.pack("<I", 4) + b"row0"


async def test_values_out_of_range_are_400(client: httpx.AsyncClient) -> None:
    body = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
        {"name": "k", "datatype": "INT8", "shape": [1], "data": [300]},
    ]}  # fmt: skip
    reply = await client.post("/v2/models/graph/infer", json=body)
    assert reply.status_code == 400
    assert "input 'k'" in reply.json()["error"]
