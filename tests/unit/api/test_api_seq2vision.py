"""Routes for seq2seq and image-classification models over the fake engine."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from lmaas.core.messages import ClassifyRequest, ClassifyResult, InferRequest, InferResult
from lmaas.core.types import Task
from lmaas.testing.fakes import FakeEngineClient, FakeModelSpec

pytestmark = pytest.mark.anyio

PNG_HEAD = b"\x89PNG\r\n\x1a\n"
INFER = "/v2/models/fake-vision/infer"


@pytest.fixture
def vision_engine() -> FakeEngineClient:
    engine = FakeEngineClient(
        [
            FakeModelSpec("fake-s2s", Task.SEQ2SEQ),
            FakeModelSpec("fake-vision", Task.IMAGE_CLASSIFICATION),
            FakeModelSpec("fake-completion", Task.COMPLETION),
        ]
    )

    async def classify(model: str, request: InferRequest) -> InferResult:
        assert isinstance(request, ClassifyRequest)
        n = len(request.images) if request.images is not None else 0
        if request.pixel_values is not None:
            n = request.pixel_values.shape[0]
        probs = [0.1, 0.7, 0.2] * n
        return ClassifyResult(request.request_id, struct.pack(f"<{3 * n}f", *probs), n, 3)

    engine.infer_handlers[ClassifyRequest] = classify
    return engine


@pytest.fixture
async def vclient(
    make_app: Callable[..., FastAPI], vision_engine: FakeEngineClient
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(vision_engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def test_completions_serve_seq2seq_models(vclient: httpx.AsyncClient) -> None:
    body = {"model": "fake-s2s", "prompt": "translate this", "max_tokens": 5}
    reply = await vclient.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"].strip()


async def test_seq2seq_decodes_like_generate_unless_asked_to_sample(
    vclient: httpx.AsyncClient, vision_engine: FakeEngineClient
) -> None:
    """No temperature: 0 (the checkpoint's decoding, its num_beams included); num_beams,
    length_penalty and n reach the worker as given."""
    body = {"model": "fake-s2s", "prompt": "translate this", "max_tokens": 5}
    assert (await vclient.post("/v1/completions", json=body)).status_code == 200
    sent = vision_engine.last_generate
    assert sent is not None
    assert sent.sampling.temperature == 0.0 and sent.sampling.num_beams is None
    beams = {**body, "num_beams": 4, "length_penalty": 0.6, "n": 2, "stream": True}
    reply = await vclient.post("/v1/completions", json=beams)
    assert reply.status_code == 200, reply.text
    sent = vision_engine.last_generate
    assert sent is not None
    assert (sent.sampling.num_beams, sent.sampling.length_penalty) == (4, 0.6)
    assert sent.sampling.n == 2 and sent.sampling.temperature == 0.0
    sampled = {**body, "temperature": 0.7, "num_beams": 1}
    assert (await vclient.post("/v1/completions", json=sampled)).status_code == 200
    assert vision_engine.last_generate is not None
    assert vision_engine.last_generate.sampling.temperature == 0.7


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("fake-s2s", {"num_beams": 0}, "num_beams"),
        ("fake-s2s", {"num_beams": 17}, "num_beams"),
        ("fake-s2s", {"num_beams": 2.5}, "num_beams"),
        ("fake-s2s", {"length_penalty": 11}, "length_penalty"),
        ("fake-completion", {"num_beams": 4}, "num_beams"),
        ("fake-completion", {"length_penalty": 1.0}, "length_penalty"),
    ],
)
async def test_bad_beam_parameters_are_400(
    vclient: httpx.AsyncClient, model: str, extra: dict[str, object], param: str
) -> None:
    body = {"model": model, "prompt": "translate this", "max_tokens": 5, **extra}
    reply = await vclient.post("/v1/completions", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


async def test_num_beams_1_is_fine_for_any_model(vclient: httpx.AsyncClient) -> None:
    body = {"model": "fake-completion", "prompt": "a b", "max_tokens": 2, "num_beams": 1}
    assert (await vclient.post("/v1/completions", json=body)).status_code == 200


async def test_v2_beam_parameters(
    vclient: httpx.AsyncClient, vision_engine: FakeEngineClient
) -> None:
    meta = (await vclient.get("/v2/models/fake-s2s")).json()
    assert {"name": "num_beams", "datatype": "INT32", "shape": [1]} in meta["inputs"]
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["a b"]}
    body = {"inputs": [text], "parameters": {"num_beams": 3, "length_penalty": 2.0}}
    assert (await vclient.post("/v2/models/fake-s2s/infer", json=body)).status_code == 200
    sent = vision_engine.last_generate
    assert sent is not None and sent.sampling.temperature == 0.0
    assert (sent.sampling.num_beams, sent.sampling.length_penalty) == (3, 2.0)
    scalar = {"name": "num_beams", "datatype": "INT32", "shape": [1], "data": [2]}
    reply = await vclient.post("/v2/models/fake-s2s/infer", json={"inputs": [text, scalar]})
    assert reply.status_code == 200, reply.text
    assert vision_engine.last_generate is not None
    assert vision_engine.last_generate.sampling.num_beams == 2
    for model, parameters in (
        ("fake-s2s", {"num_beams": 40}),
        ("fake-completion", {"num_beams": 2}),
    ):
        body = {"inputs": [text], "parameters": parameters}
        reply = await vclient.post(f"/v2/models/{model}/infer", json=body)
        assert reply.status_code == 400 and "num_beams" in reply.json()["error"]
    completion_meta = (await vclient.get("/v2/models/fake-completion")).json()
    assert "num_beams" not in {i["name"] for i in completion_meta["inputs"]}


async def test_chat_on_a_seq2seq_model_is_refused_clearly(vclient: httpx.AsyncClient) -> None:
    body = {"model": "fake-s2s", "messages": [{"role": "user", "content": "hi"}]}
    reply = await vclient.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "model" and "/v1/completions" in error["message"]
    assert "seq2seq" in error["message"]


async def test_v2_generation_on_seq2seq(vclient: httpx.AsyncClient) -> None:
    meta = (await vclient.get("/v2/models/fake-s2s")).json()
    assert meta["inputs"][0]["name"] == "text_input"
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["a b"]}]}
    reply = await vclient.post("/v2/models/fake-s2s/infer", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == ["a b"]


async def test_v2_image_in_json_is_base64(
    vclient: httpx.AsyncClient, vision_engine: FakeEngineClient
) -> None:
    image = PNG_HEAD + b"\x00\x01rest-of-file"
    data = [
        base64.b64encode(image).decode(),
        "data:image/png;base64," + base64.b64encode(image).decode(),
    ]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data}]}
    reply = await vclient.post(INFER, json=body)
    assert reply.status_code == 200, reply.text
    sent = vision_engine.last_infer
    assert isinstance(sent, ClassifyRequest) and sent.images == [image, image]
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 3]
    assert outputs["probabilities"]["data"] == pytest.approx([0.1, 0.7, 0.2] * 2)
    # The fake model reports no labels: the class index names the label.
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["1", "1"],
    }


async def test_v2_image_binary_extension_passes_raw_files(
    vclient: httpx.AsyncClient, vision_engine: FakeEngineClient
) -> None:
    image = PNG_HEAD + b"\xff\xfe binary"
    blob = struct.pack("<I", len(image)) + image
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    reply = await vclient.post(
        INFER,
        content=head + blob,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 200, reply.text
    sent = vision_engine.last_infer
    assert isinstance(sent, ClassifyRequest) and sent.images == [image]
    size = int(reply.headers["inference-header-content-length"])
    outputs = json.loads(reply.content[:size])["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in outputs] == [12, 5]
    assert struct.unpack("<3f", reply.content[size : size + 12]) == pytest.approx((0.1, 0.7, 0.2))
    assert reply.content[size + 12 :] == struct.pack("<I", 1) + b"1"


async def test_v2_pixel_values_are_packed_fp32(
    vclient: httpx.AsyncClient, vision_engine: FakeEngineClient
) -> None:
    values = [0.5, -1.0, 2.25, 0.0] * 3
    body = {
        "inputs": [
            {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": values}
        ]
    }
    reply = await vclient.post(INFER, json=body)
    assert reply.status_code == 200, reply.text
    sent = vision_engine.last_infer
    assert isinstance(sent, ClassifyRequest) and sent.pixel_values is not None
    assert sent.pixel_values.shape == [1, 3, 2, 2]
    assert struct.unpack("<12f", sent.pixel_values.data) == tuple(values)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}], "must be BYTES"),
        ([{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}], "empty"),
        ([{"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}], "shape"),
        (
            [{"name": "pixel_values", "datatype": "INT32", "shape": [1], "data": [1]}],
            "must be FP32",
        ),
        ([{"name": "pixel_values", "datatype": "FP32", "shape": [2], "data": [1, 2]}], "shape"),
        ([{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "unexpected input"),
        (
            [
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]},
                {"name": "pixel_values", "datatype": "FP32", "shape": [1], "data": [1]},
            ],
            "exactly one",
        ),
        (
            [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["data:image/png,x"]}],
            "base64",
        ),
    ],
)
async def test_v2_image_bad_inputs_are_400(
    vclient: httpx.AsyncClient, inputs: list[dict[str, object]], message: str
) -> None:
    reply = await vclient.post(INFER, json={"inputs": inputs})
    assert reply.status_code == 400
    assert message in reply.json()["error"]
