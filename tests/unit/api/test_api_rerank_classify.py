"""``/v1/rerank``, ``/v1/classify`` and their v2 inference over the fake engine."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_helpers import post_json

from lmaas.api import ApiServices, DefaultApiConfig, create_app
from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    InferRequest,
    InferResult,
    RerankRequest,
    ScoreResult,
)
from lmaas.core.types import Task
from lmaas.testing.fakes import FakeEngineClient, FakeModelSpec, default_fake_models

pytestmark = pytest.mark.anyio

LABELS = ["negative", "neutral", "positive"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


async def _score(model: str, request: InferRequest) -> InferResult:
    """Score = share of the query's words found in the document (deterministic, no model)."""
    assert isinstance(request, RerankRequest)
    words = set(request.query.lower().split())
    scores = [len(words & set(d.lower().split())) / len(words) for d in request.documents]
    tokens = sum(len(request.query.split()) + len(d.split()) for d in request.documents)
    return ScoreResult(request.request_id, scores, tokens)


async def _classify(model: str, request: InferRequest) -> InferResult:
    """Text i (or image i) gets all its mass on class ``len(item) % 3`` (0.8), 0.1 elsewhere."""
    assert isinstance(request, ClassifyRequest)
    items: list[Any] = request.texts if request.texts is not None else request.images or []
    rows = []
    for item in items:
        row = [0.1, 0.1, 0.1]
        row[len(item) % 3] = 0.8
        rows.extend(row)
    probs = struct.pack(f"<{len(rows)}f", *rows)
    tokens = sum(len(t.split()) for t in request.texts or [])
    return ClassifyResult(request.request_id, probs, len(items), 3, tokens)


@pytest.fixture
def engine() -> FakeEngineClient:
    models = [
        *default_fake_models(),
        FakeModelSpec("fake-rerank", Task.RERANK),
        FakeModelSpec("fake-cls", Task.CLASSIFICATION, labels=LABELS),
        FakeModelSpec("fake-img", Task.IMAGE_CLASSIFICATION, labels=LABELS),
        FakeModelSpec("fake-nolabels", Task.CLASSIFICATION),
    ]
    fake = FakeEngineClient(models)
    fake.infer_handlers[RerankRequest] = _score
    fake.infer_handlers[ClassifyRequest] = _classify
    return fake


@pytest.fixture
async def client(engine: FakeEngineClient) -> AsyncIterator[httpx.AsyncClient]:
    config = DefaultApiConfig(max_body_bytes=64 * 1024, max_rerank_documents=4)
    app = create_app(ApiServices(engine=engine, config=config))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://lmaas.test") as c:
        yield c


DOCS = ["the cat sat", "a dog barked", "my cat eats fish", "cat"]


def _rerank(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-rerank", "query": "cat eats fish", "documents": DOCS, **extra}


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
async def test_rerank_sorts_by_relevance(
    client: httpx.AsyncClient, engine: FakeEngineClient, path: str
) -> None:
    response = await client.post(path, json=_rerank())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("rerank-") and body["model"] == "fake-rerank"
    assert [r["index"] for r in body["results"]] == [2, 0, 3, 1]  # ties keep input order
    assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in (2, 0, 3, 1)]
    assert body["results"][0]["relevance_score"] == pytest.approx(1.0)
    assert body["usage"]["total_tokens"] == 3 * 4 + 11
    assert isinstance(engine.last_infer, RerankRequest) and engine.last_infer.documents == DOCS


async def test_rerank_top_n_and_return_documents(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/rerank", json=_rerank(top_n=2))).json()
    assert [r["index"] for r in body["results"]] == [2, 0]
    for top_n in (0, None, 10):  # vLLM's 0 and an absent or oversized top_n mean "all"
        body = (await client.post("/v1/rerank", json=_rerank(top_n=top_n))).json()
        assert len(body["results"]) == 4
    body = (await client.post("/v1/rerank", json=_rerank(return_documents=False))).json()
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])


async def test_rerank_accepts_document_objects(client: httpx.AsyncClient) -> None:
    documents = [{"text": "cat eats"}, "dog", {"text": "fish", "title": "ignored"}]
    body = (await client.post("/v1/rerank", json=_rerank(documents=documents))).json()
    assert [(r["index"], r["document"]["text"]) for r in body["results"]] == [
        (0, "cat eats"),
        (2, "fish"),
        (1, "dog"),
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"query": "  "}, "query"),
        ({"documents": []}, "documents"),
        ({"documents": ["a", "b", "c", "d", "e"]}, "documents"),  # over the cap of 4
        ({"documents": ["a", ""]}, "documents[1]"),
        ({"top_n": -1}, "top_n"),
        ({"documents": [{"title": "no text"}]}, "documents.0.str"),
        ({"model": "fake-embed"}, "model"),
    ],
)
async def test_rerank_bad_requests(
    client: httpx.AsyncClient, engine: FakeEngineClient, extra: dict[str, Any], param: str
) -> None:
    error = _error(await client.post("/v1/rerank", json=_rerank(**extra)))
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert engine.last_infer is None  # refused before it reached a worker


async def test_rerank_limit_message_and_unknown_model(client: httpx.AsyncClient) -> None:
    error = _error(await client.post("/v1/rerank", json=_rerank(documents=["x"] * 9)))
    assert "at most 4" in error["message"]
    assert _error(await client.post("/v1/rerank", json=_rerank(model="nope")), 404)
    assert _error(await post_json(client, "/v1/rerank", [1, 2]))  # not an object


def _classify_body(items: Any, model: str = "fake-cls") -> dict[str, Any]:
    return {"model": model, "input": items}


@pytest.mark.parametrize("path", ["/v1/classify", "/classify"])
async def test_classify_texts(client: httpx.AsyncClient, path: str) -> None:
    response = await client.post(path, json=_classify_body(["abc", "abcd", "hello world"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["id"].startswith("classify-")
    assert body["model"] == "fake-cls" and isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["label"] for d in body["data"]] == ["negative", "neutral", "positive"]
    first = body["data"][0]
    assert first["num_classes"] == 3 and first["score"] == pytest.approx(0.8)
    assert first["probs"] == pytest.approx([0.8, 0.1, 0.1])
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0}

    single = (await client.post(path, json=_classify_body("ab"))).json()
    assert [d["label"] for d in single["data"]] == ["positive"]


async def test_classify_without_labels_names_classes(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/classify", json=_classify_body("ab", "fake-nolabels"))).json()
    assert body["data"][0]["label"] == "LABEL_2"


@pytest.mark.parametrize(
    ("items", "param", "needle"),
    [
        ([], "input", "empty"),
        (["ok", " "], "input[1]", "empty"),
        (["x"] * 2049, "input", "at most"),
        (PNG_URL, "input", "not images"),
        (["fine", {"type": "image_url", "image_url": {"url": PNG_URL}}], "input[1]", "not images"),
    ],
)
async def test_classify_text_model_refusals(
    client: httpx.AsyncClient, items: Any, param: str, needle: str
) -> None:
    error = _error(await client.post("/v1/classify", json=_classify_body(items)))
    assert error["param"] == param and needle in error["message"]


async def test_classify_images(client: httpx.AsyncClient, engine: FakeEngineClient) -> None:
    content = {"type": "image_url", "image_url": {"url": PNG_URL}}
    items = [PNG_URL, content, {"type": "image_url", "image_url": PNG_URL}]
    response = await client.post("/v1/classify", json=_classify_body(items, "fake-img"))
    assert response.status_code == 200, response.text
    request = engine.last_infer
    assert isinstance(request, ClassifyRequest) and request.texts is None
    assert request.images == [PNG, PNG, PNG]
    body = response.json()
    assert [d["label"] for d in body["data"]] == [LABELS[len(PNG) % 3]] * 3
    single = await client.post("/v1/classify", json=_classify_body(content, "fake-img"))
    assert single.status_code == 200 and len(single.json()["data"]) == 1


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://example.com/cat.png", "does not fetch"),
        ("http://169.254.169.254/latest", "does not fetch"),
        ("a photo of a cat", "not an image"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64,not*base64!", "invalid base64"),
        ("data:image/png;base64,", "no image data"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64", "malformed"),
    ],
)
async def test_classify_bad_images(
    client: httpx.AsyncClient, engine: FakeEngineClient, url: str, needle: str
) -> None:
    body = _classify_body([PNG_URL, url], "fake-img")
    error = _error(await client.post("/v1/classify", json=body))
    assert error["param"] == "input[1]" and needle in error["message"], error
    assert engine.last_infer is None
    assert (await client.post("/v1/classify", json=_classify_body(PNG_URL, "fake-img"))).is_success


async def test_classify_routes_only_classifiers(client: httpx.AsyncClient) -> None:
    error = _error(await client.post("/v1/classify", json=_classify_body("x", "fake-rerank")))
    assert error["param"] == "model" and "rerank model" in error["message"]
    bad_part = {"type": "image_url"}
    error = _error(await client.post("/v1/classify", json=_classify_body([bad_part])))
    assert error["param"] is not None and error["param"].startswith("input")


async def test_models_list_their_task(client: httpx.AsyncClient) -> None:
    cards = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert cards["fake-rerank"]["task"] == "rerank"
    assert cards["fake-cls"]["task"] == "classification"
    assert cards["fake-chat"]["task"] == "chat"
    assert (await client.get("/v1/models/fake-img")).json()["task"] == "image-classification"


def _v2_text(data: Any, shape: list[int], name: str = "text", datatype: str = "BYTES") -> Any:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


async def test_v2_classification(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/fake-cls")).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert meta["outputs"][0]["shape"] == [-1, 3]

    body = {"id": "r1", "inputs": [_v2_text(["abc", "abcd"], [2, 1])]}
    response = (await post_json(client, "/v2/models/fake-cls/infer", body)).json()
    assert response["id"] == "r1"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 3]
    assert outputs["probabilities"]["data"] == pytest.approx([0.8, 0.1, 0.1, 0.1, 0.8, 0.1])
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["negative", "neutral"],
    }
    only = {"inputs": [_v2_text(["ab"], [1])], "outputs": [{"name": "label"}]}
    response = (await post_json(client, "/v2/models/fake-cls/infer", only)).json()
    assert [o["name"] for o in response["outputs"]] == ["label"]
    assert response["outputs"][0]["data"] == ["positive"]


@pytest.mark.parametrize(
    ("inputs", "outputs", "needle"),
    [
        ([_v2_text([1, 2], [2], datatype="INT32")], None, "must be BYTES"),
        ([_v2_text(["a", "b"], [1, 2])], None, "shape"),
        ([_v2_text(["a"], [1], name="image")], None, "unexpected input"),
        ([_v2_text(["a", ""], [2])], None, "empty"),
        ([_v2_text(["a"], [1])], [{"name": "logits"}], "unknown output"),
    ],
)
async def test_v2_classification_refusals(
    client: httpx.AsyncClient, inputs: Any, outputs: Any, needle: str
) -> None:
    body: dict[str, Any] = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    response = await post_json(client, "/v2/models/fake-cls/infer", body)
    assert response.status_code == 400 and needle in response.json()["error"]
    good = {"inputs": [_v2_text(["fine"], [1])]}
    assert (await post_json(client, "/v2/models/fake-cls/infer", good)).status_code == 200


async def test_v2_rerank(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/fake-rerank")).json()
    assert [i["name"] for i in meta["inputs"]] == ["query", "documents"]
    inputs = [_v2_text(["cat eats fish"], [1], "query"), _v2_text(DOCS[:2], [2, 1], "documents")]
    response = (await post_json(client, "/v2/models/fake-rerank/infer", {"inputs": inputs})).json()
    [scores] = response["outputs"]
    assert scores["name"] == "scores" and scores["shape"] == [2]
    assert scores["data"] == pytest.approx([1 / 3, 0.0])
    too_many = [inputs[0], _v2_text(["d"] * 5, [5], "documents")]
    response = await post_json(client, "/v2/models/fake-rerank/infer", {"inputs": too_many})
    assert response.status_code == 400 and "at most 4" in response.json()["error"]
    two_queries = [_v2_text(["a", "b"], [2], "query"), inputs[1]]
    response = await post_json(client, "/v2/models/fake-rerank/infer", {"inputs": two_queries})
    assert response.status_code == 400 and "one string" in response.json()["error"]
