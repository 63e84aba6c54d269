"""Rerank and text classification through a real ``lmaas serve`` with real worker processes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_text_heads import (
    CLASSIFIER_LABELS,
    build_tiny_classifier,
    build_tiny_cross_encoder,
)
from tests.integration.serverproc import ServerProcess, start_server

QUERY = "what does a cat eat"
DOCUMENTS = ["Cats eat fish and meat.", "The stock market fell today.", "A cat sat. " * 60]
TEXTS = ["I love this", "This is terrible", "It is a table"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text-heads")
    return {
        "rerank": build_tiny_cross_encoder(root / "tiny-rerank", seed=5),
        "cls": build_tiny_classifier(root / "tiny-cls", seed=6),
    }


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]
) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("home-text-heads")
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    # Tasks inferred by the import itself: rerank (one logit) and classification (id2label).
    assert registry.import_model(str(model_dirs["rerank"]), name="tiny-rerank").task == "rerank"
    assert registry.import_model(str(model_dirs["cls"]), name="tiny-cls").task == "classification"
    registry.close()
    proc = start_server(home, ["tiny-rerank", "tiny-cls"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def test_models_are_listed_with_their_tasks(server: ServerProcess) -> None:
    cards = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    assert {c["id"]: c["task"] for c in cards} == {
        "tiny-rerank": "rerank",
        "tiny-cls": "classification",
    }


def test_rerank_matches_cross_encoder(server: ServerProcess, model_dirs: dict[str, Path]) -> None:
    from sentence_transformers import CrossEncoder

    body = {"model": "tiny-rerank", "query": QUERY, "documents": DOCUMENTS}
    response = _post(server, "/v1/rerank", body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    reference = CrossEncoder(str(model_dirs["rerank"]), device="cpu")
    expected = reference.predict([(QUERY, d) for d in DOCUMENTS], convert_to_numpy=True)
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable").tolist()
    by_index = {r["index"]: r["relevance_score"] for r in results}
    np.testing.assert_allclose([by_index[i] for i in range(3)], expected, atol=1e-5, rtol=0)
    assert results[0]["document"]["text"] == DOCUMENTS[results[0]["index"]]
    assert response.json()["usage"]["total_tokens"] > 128  # the long pair counts 128 (truncated)

    top = _post(server, "/rerank", {**body, "top_n": 1, "return_documents": False}).json()
    assert top["results"] == [
        {"index": results[0]["index"], "relevance_score": top["results"][0]["relevance_score"]}
    ]


def test_classify_matches_the_model(server: ServerProcess, model_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    response = _post(server, "/v1/classify", {"model": "tiny-cls", "input": TEXTS})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    got = np.array([d["probs"] for d in data])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dirs["cls"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dirs["cls"])).eval()
    with torch.inference_mode():
        batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
        expected = torch.softmax(model(**batch).logits, dim=-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert [d["label"] for d in data] == [CLASSIFIER_LABELS[i] for i in expected.argmax(axis=1)]
    assert all(d["num_classes"] == 3 for d in data)
    assert response.json()["usage"]["prompt_tokens"] > 0


def test_v2_metadata_and_infer(server: ServerProcess) -> None:
    meta = httpx.get(f"{server.base_url}/v2/models/tiny-cls").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    text = {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": TEXTS[:2]}
    body = {"inputs": [text], "outputs": [{"name": "label"}, {"name": "probabilities"}]}
    response = _post(server, "/v2/models/tiny-cls/infer", body)
    assert response.status_code == 200, response.text
    [label, probs] = response.json()["outputs"]
    assert label["shape"] == [2] and set(label["data"]) <= set(CLASSIFIER_LABELS)
    assert probs["shape"] == [2, 3] and sum(probs["data"][:3]) == pytest.approx(1.0, abs=1e-5)

    query = {"name": "query", "datatype": "BYTES", "shape": [1], "data": [QUERY]}
    documents = {"name": "documents", "datatype": "BYTES", "shape": [3], "data": DOCUMENTS}
    scores = _post(server, "/v2/models/tiny-rerank/infer", {"inputs": [query, documents]})
    assert scores.status_code == 200, scores.text
    rerank = _post(
        server, "/v1/rerank", {"model": "tiny-rerank", "query": QUERY, "documents": DOCUMENTS}
    )
    by_index = {r["index"]: r["relevance_score"] for r in rerank.json()["results"]}
    np.testing.assert_allclose(
        scores.json()["outputs"][0]["data"], [by_index[i] for i in range(3)], atol=1e-6
    )


PNG_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n0000").decode()
BAD_REQUESTS = [
    ("/v1/rerank", {"model": "tiny-rerank", "query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"model": "tiny-rerank", "query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"model": "tiny-rerank", "query": "q", "documents": ["d"] * 1001}, "documents"),
    (
        "/v1/rerank",
        {"model": "tiny-rerank", "query": "q", "documents": ["d"], "top_n": -2},
        "top_n",
    ),
    ("/v1/rerank", {"model": "tiny-cls", "query": "q", "documents": ["d"]}, "model"),
    ("/v1/classify", {"model": "tiny-cls", "input": []}, "input"),
    ("/v1/classify", {"model": "tiny-cls", "input": [PNG_URL]}, "input[0]"),
    ("/v1/classify", {"model": "tiny-rerank", "input": "text"}, "model"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_requests_get_400_and_the_workers_stay_up(
    server: ServerProcess, path: str, body: dict[str, Any], param: str
) -> None:
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    good_rerank = {"model": "tiny-rerank", "query": QUERY, "documents": DOCUMENTS[:1]}
    assert _post(server, "/v1/rerank", good_rerank).status_code == 200
    assert _post(server, "/v1/classify", {"model": "tiny-cls", "input": "ok"}).status_code == 200


def test_v2_bad_inputs(server: ServerProcess) -> None:
    wrong_type = {"name": "text", "datatype": "INT32", "shape": [1], "data": [3]}
    response = _post(server, "/v2/models/tiny-cls/infer", {"inputs": [wrong_type]})
    assert response.status_code == 400 and "BYTES" in response.json()["error"]
    wrong_shape = {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}
    response = _post(server, "/v2/models/tiny-cls/infer", {"inputs": [wrong_shape]})
    assert response.status_code == 400 and "shape" in response.json()["error"]
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}
    assert _post(server, "/v2/models/tiny-cls/infer", {"inputs": [text]}).status_code == 200
