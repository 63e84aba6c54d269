"""The rerank and text-classification runners against sentence-transformers and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from runtimes_helpers import make_spec
from sentence_transformers import CrossEncoder

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    RequestError,
    RerankRequest,
    ScoreResult,
    TensorData,
)
from lmaas.core.types import Task
from lmaas.registry.inspection import inspect_model_dir
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.classification.torch import TorchTextClassificationRunner
from lmaas.runtimes.rerank.torch import TorchRerankRunner
from lmaas.testing.tiny_text_heads import (
    CLASSIFIER_LABELS,
    build_tiny_classifier,
    build_tiny_cross_encoder,
)

QUERY = "what does a cat eat"
DOCUMENTS = [
    "Cats eat fish and meat.",
    "The stock market fell today.",
    "  Café, naïve and Zürich 🙂  ",
    "A cat sat on the mat. " * 40,  # over the 128-token limit: truncated longest-first
    "x",
]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "model", seed=1)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("cls") / "model", seed=2)


@pytest.fixture(scope="module")
def reranker(cross_encoder_dir: Path) -> TorchRerankRunner:
    runner = TorchRerankRunner(make_spec(cross_encoder_dir, task="rerank", max_batch_size=2))
    runner.load()
    return runner


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path) -> TorchTextClassificationRunner:
    spec = make_spec(classifier_dir, task="classification", max_batch_size=2)
    runner = TorchTextClassificationRunner(spec)
    runner.load()
    return runner


def _scores(result: ScoreResult | RequestError) -> list[float]:
    assert isinstance(result, ScoreResult), result
    return result.scores


def _probs(result: ClassifyResult | RequestError) -> np.ndarray:
    assert isinstance(result, ClassifyResult), result
    return np.frombuffer(result.probs, "<f4").reshape(result.num_inputs, result.num_labels)


def test_the_tiny_models_import_with_their_tasks(
    cross_encoder_dir: Path, classifier_dir: Path
) -> None:
    # The cross-encoder ships a modules.json as sentence-transformers 5+ saves it: not an embedder.
    assert (cross_encoder_dir / "modules.json").is_file()
    assert inspect_model_dir(cross_encoder_dir).task is Task.RERANK
    facts = inspect_model_dir(classifier_dir)
    assert facts.task is Task.CLASSIFICATION and facts.labels == list(CLASSIFIER_LABELS)


def test_catalog_builds_both_runners(tmp_path: Path) -> None:
    assert isinstance(create_runner(make_spec(tmp_path, "rerank")), TorchRerankRunner)
    runner = create_runner(make_spec(tmp_path, "classification"))
    assert isinstance(runner, TorchTextClassificationRunner)


def test_rerank_matches_cross_encoder_predict(
    reranker: TorchRerankRunner, cross_encoder_dir: Path
) -> None:
    # Two requests whose pairs the batcher mixes (max_batch_size=2, sorted by length).
    results = reranker.rerank(
        [RerankRequest("a", QUERY, DOCUMENTS[:2]), RerankRequest("b", QUERY, DOCUMENTS[2:])]
    )
    got = np.array([s for r in results for s in _scores(r)])
    reference = CrossEncoder(str(cross_encoder_dir), device="cpu")
    expected = reference.predict([(QUERY, d) for d in DOCUMENTS], convert_to_numpy=True)
    assert got.shape == expected.shape == (5,)
    assert np.all((got > 0) & (got < 1))  # sigmoid, as CrossEncoder applies by default
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert len(set(got.round(7).tolist())) == 5  # the scores tell documents apart


def test_rerank_info_and_token_counts(reranker: TorchRerankRunner) -> None:
    info = reranker.load()
    assert (info.context_length, info.max_input_tokens, info.dtype) == (128, 128, "float32")
    assert [t.name for t in info.inputs or []] == ["query", "documents"]
    reranker.warmup()
    [short, long] = reranker.rerank(
        [RerankRequest("s", "hello", ["hello world"]), RerankRequest("l", QUERY, [DOCUMENTS[3]])]
    )
    tokens = len(reranker._classifier._tokenizer("hello", "hello world")["input_ids"])
    assert isinstance(short, ScoreResult) and short.prompt_tokens == tokens
    assert isinstance(long, ScoreResult) and long.prompt_tokens == 128  # truncated, counted so


def test_rerank_bad_requests_fail_alone(reranker: TorchRerankRunner) -> None:
    results = reranker.rerank(
        [
            RerankRequest("q", "  ", ["doc"]),
            RerankRequest("d", QUERY, []),
            RerankRequest("e", QUERY, ["fine", ""]),
            RerankRequest("ok", QUERY, ["fine"]),
        ]
    )
    errors = [r for r in results if isinstance(r, RequestError)]
    assert [(e.code, e.param) for e in errors] == [
        ("invalid_request", "query"),
        ("invalid_request", "documents"),
        ("invalid_request", "documents[1]"),
    ]
    assert isinstance(results[3], ScoreResult) and len(results[3].scores) == 1
    [wrong] = run_batch(reranker, [ClassifyRequest("c", texts=["x"])])
    assert isinstance(wrong, RequestError) and "rerank" in wrong.message


def test_configured_activation_is_applied(tmp_path: Path) -> None:
    model_dir = build_tiny_cross_encoder(tmp_path / "m", seed=4)
    # config_sentence_transformers.json wins over config.json, as in CrossEncoder.
    st_config = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    st_config["activation_fn"] = "torch.nn.modules.linear.Identity"
    (model_dir / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    runner = TorchRerankRunner(make_spec(model_dir, task="rerank"))
    runner.load()
    [result] = runner.rerank([RerankRequest("r", QUERY, DOCUMENTS)])
    reference = CrossEncoder(str(model_dir), device="cpu")
    assert isinstance(reference.activation_fn, torch.nn.Identity)
    expected = reference.predict([(QUERY, d) for d in DOCUMENTS], convert_to_numpy=True)
    np.testing.assert_allclose(_scores(result), expected, atol=1e-5, rtol=0)


def test_a_multi_class_model_is_no_reranker(classifier_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="num_labels=1"):
        TorchRerankRunner(make_spec(classifier_dir, task="rerank")).load()


def test_classifier_matches_the_transformers_pipeline(
    classifier: TorchTextClassificationRunner, classifier_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    texts = DOCUMENTS
    results = classifier.classify(
        [ClassifyRequest("a", texts=texts[:3]), ClassifyRequest("b", texts=texts[3:])]
    )
    got = np.concatenate([_probs(r) for r in results])
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)

    pipe = pipeline("text-classification", model=str(classifier_dir), device="cpu", top_k=None)
    outputs = pipe(texts, truncation=True)
    expected = np.array([[next(o["score"] for o in row if o["label"] == name)
                          for name in CLASSIFIER_LABELS] for row in outputs])  # fmt: skip
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(str(classifier_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).eval()
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        softmax = torch.softmax(model(**batch).logits, dim=-1).numpy()
    np.testing.assert_allclose(got, softmax, atol=1e-5, rtol=0)


def test_classifier_info_labels_and_specs(classifier: TorchTextClassificationRunner) -> None:
    info = classifier.load()
    assert info.labels == list(CLASSIFIER_LABELS)
    assert [(t.name, t.datatype, t.shape) for t in info.inputs or []] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, t.shape) for t in info.outputs or []] == [
        ("probabilities", "FP32", [-1, 3]),
        ("label", "BYTES", [-1]),
    ]
    classifier.warmup()


def test_classifier_refuses_images_and_empty_input(
    classifier: TorchTextClassificationRunner,
) -> None:
    pixels = TensorData("pixel_values", "FP32", [1, 3, 2, 2], b"\0" * 48)
    results = classifier.classify(
        [
            ClassifyRequest("img", images=[b"\x89PNG\r\n"]),
            ClassifyRequest("px", pixel_values=pixels),
            ClassifyRequest("none"),
            ClassifyRequest("empty", texts=[]),
            ClassifyRequest("blank", texts=["ok", " "]),
            ClassifyRequest("ok", texts=["fine"]),
        ]
    )
    errors = [r for r in results if isinstance(r, RequestError)]
    assert len(errors) == 5 and all(e.code == "invalid_request" for e in errors)
    assert "classifies text" in errors[0].message and "classifies text" in errors[1].message
    assert [e.param for e in errors[2:]] == ["input", "input", "input[1]"]
    assert _probs(results[5]).shape == (1, 3)
