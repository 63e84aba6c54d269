"""Rerank, text and image classification on safetensors versions with backend onnxruntime:
exported once into the cache, served on ONNX Runtime with the torch backend's numbers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtimes_helpers import make_spec
from test_vision_runner import encode, sample_images

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    FileDigest,
    RequestError,
    RerankRequest,
    ScoreResult,
)
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.classification.onnx import OnnxTextClassificationRunner
from lmaas.runtimes.classification.torch import TorchTextClassificationRunner
from lmaas.runtimes.int8_weights import INT8_WEIGHTS_FILE
from lmaas.runtimes.onnx_export import (
    SEQUENCE_CLASSIFIER_RECIPE,
    export_spec_sequence_classifier,
    served_graph,
)
from lmaas.runtimes.onnx_session import build_once, source_digest
from lmaas.runtimes.rerank.onnx import OnnxRerankRunner
from lmaas.runtimes.rerank.torch import TorchRerankRunner
from lmaas.runtimes.vision.onnx import OnnxImageClassificationRunner
from lmaas.runtimes.vision.torch import TorchImageClassificationRunner
from lmaas.testing.tiny_text_heads import build_tiny_classifier, build_tiny_cross_encoder
from lmaas.testing.tiny_vision import build_tiny_image_classifier

QUERY = "what does a cat eat"
DOCUMENTS = ["Cats eat fish and meat.", "The stock market fell today.", "A cat sat. " * 60, "x"]
TEXTS = ["I love this", "This is terrible", "  Café, naïve 🙂 ", "It is a table. " * 50]
ORT = {"backend": "onnxruntime"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ort-heads")
    build_tiny_cross_encoder(root / "rerank", seed=1)
    build_tiny_classifier(root / "cls", seed=2)
    build_tiny_image_classifier(root / "vit")
    return root


def _spec(
    root: Path, name: str, task: str, options: dict[str, str], cache: str = "cache"
) -> object:
    return make_spec(
        root / name, task, max_batch_size=2, options=options, cache_dir=str(root / cache)
    )


def _scores(results: list[ScoreResult | RequestError]) -> np.ndarray:
    assert all(isinstance(r, ScoreResult) for r in results), results
    return np.array([s for r in results if isinstance(r, ScoreResult) for s in r.scores])


def _probs(result: ClassifyResult | RequestError) -> np.ndarray:
    assert isinstance(result, ClassifyResult), result
    return np.frombuffer(result.probs, "<f4").reshape(result.num_inputs, result.num_labels)


def _rerank(runner: TorchRerankRunner) -> np.ndarray:
    requests = [RerankRequest("a", QUERY, DOCUMENTS[:2]), RerankRequest("b", QUERY, DOCUMENTS[2:])]
    return _scores(runner.rerank(requests))


def _classify(runner: TorchTextClassificationRunner) -> np.ndarray:
    requests = [ClassifyRequest("a", texts=TEXTS[:1]), ClassifyRequest("b", texts=TEXTS[1:])]
    return np.concatenate([_probs(r) for r in runner.classify(requests)])


def test_rerank_on_onnxruntime_equals_torch(root: Path) -> None:
    runner = create_runner(_spec(root, "rerank", "rerank", ORT))  # type: ignore[arg-type]
    assert isinstance(runner, OnnxRerankRunner)
    info = runner.load()
    assert (info.dtype, info.device) == ("float32", "cpu")
    graph = runner._classifier.graph_path
    assert graph is not None and graph.is_relative_to(root / "cache")
    assert not list((root / "rerank").glob("*.onnx"))  # the version directory is untouched
    reference = TorchRerankRunner(make_spec(root / "rerank", "rerank", max_batch_size=2))
    reference.load()
    got, expected = _rerank(runner), _rerank(reference)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_classification_on_onnxruntime_equals_torch_and_reuses_the_export(root: Path) -> None:
    runner = create_runner(_spec(root, "cls", "classification", ORT))  # type: ignore[arg-type]
    assert isinstance(runner, OnnxTextClassificationRunner)
    info = runner.load()
    reference = TorchTextClassificationRunner(make_spec(root / "cls", "classification"))
    assert reference.load().labels == info.labels
    np.testing.assert_allclose(_classify(runner), _classify(reference), atol=1e-5, rtol=0)
    graph = runner._classifier.graph_path
    assert graph is not None
    mtime = graph.stat().st_mtime_ns
    again = create_runner(_spec(root, "cls", "classification", ORT))  # type: ignore[arg-type]
    again.load()
    assert isinstance(again, OnnxTextClassificationRunner)
    assert again._classifier.graph_path == graph and graph.stat().st_mtime_ns == mtime


def test_image_classification_on_onnxruntime_equals_torch(root: Path) -> None:
    runner = create_runner(_spec(root, "vit", "image-classification", ORT))  # type: ignore[arg-type]
    assert isinstance(runner, OnnxImageClassificationRunner)
    info = runner.load()
    runner.warmup()
    reference = TorchImageClassificationRunner(make_spec(root / "vit", "image-classification"))
    assert reference.load().labels == info.labels
    images = [encode(image, "PNG") for image in sample_images()]
    got = _probs(runner.classify(ClassifyRequest("i", images=images)))
    expected = _probs(reference.classify(ClassifyRequest("i", images=images)))
    assert got.shape == (len(images), len(info.labels or []))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert runner.graph_path is not None and runner.graph_path.is_relative_to(root / "cache")


@pytest.mark.parametrize(
    ("name", "task"), [("cls", "classification"), ("vit", "image-classification")]
)
def test_int8_runs_a_cached_int8_copy(root: Path, name: str, task: str) -> None:
    spec = _spec(root, name, task, {**ORT, "quantize": "int8"})
    runner = create_runner(spec)  # type: ignore[arg-type]
    assert runner.load().dtype == "int8"
    float_runner = create_runner(_spec(root, name, task, ORT))  # type: ignore[arg-type]
    float_runner.load()
    if task == "classification":
        got, expected = _classify(runner), _classify(float_runner)  # type: ignore[arg-type]
    else:
        images = [encode(image, "PNG") for image in sample_images()]
        got = _probs(runner.classify(ClassifyRequest("i", images=images)))  # type: ignore[attr-defined]
        expected = _probs(float_runner.classify(ClassifyRequest("i", images=images)))  # type: ignore[attr-defined]
    np.testing.assert_allclose(got, expected, atol=0.05)


def test_the_cache_key_covers_files_and_exporter(root: Path) -> None:
    """A changed file digest or exporter recipe names another cache folder."""

    def digest(sha: str, recipe: str) -> str:
        files = [FileDigest(path="model.safetensors", size_bytes=1, sha256=sha)]
        return source_digest(make_spec(root / "cls", files=files), recipe)

    assert digest("a" * 64, "r1") != digest("b" * 64, "r1") != digest("b" * 64, "r2")
    assert digest("a" * 64, "r1") == digest("a" * 64, "r1")


def test_an_int8_torch_version_is_not_exported(root: Path, tmp_path: Path) -> None:
    model_dir = build_tiny_classifier(tmp_path / "cls", seed=2)
    (model_dir / INT8_WEIGHTS_FILE).write_bytes(b"")
    spec = make_spec(model_dir, "classification", options=ORT, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ModelLoadError, match=r"serve it with serving\.backend torch"):
        served_graph(
            spec, recipe=SEQUENCE_CLASSIFIER_RECIPE, export=export_spec_sequence_classifier
        )


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    """Replicas loading at once: one builds, the others wait and reuse; none sees a partial
    file."""
    calls: list[int] = []
    dest = tmp_path / "cache" / "model.onnx"

    def build(tmp: Path) -> None:
        calls.append(1)
        tmp.write_bytes(b"half")
        time.sleep(0.2)
        tmp.write_bytes(b"complete graph")

    seen: list[bytes] = []

    def worker() -> None:
        seen.append(build_once(dest, build).read_bytes())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert seen == [b"complete graph"] * 4
    assert sorted(p.name for p in dest.parent.iterdir()) == [".model.onnx.lock", "model.onnx"]


@pytest.mark.parametrize(("name", "task"), [("rerank", "rerank"), ("cls", "classification")])
def test_packed_and_padded_graphs_give_the_same_numbers(root: Path, name: str, task: str) -> None:
    """BERT sequence classifiers export on packed rows (segment ids of pairs included); the
    option ``packed=false`` exports the padded graph; both equal torch."""
    import onnx

    from lmaas.runtimes.onnx_export import PACKED_CLASSIFIER_INPUTS

    results = {}
    for packed in ("true", "false"):
        runner = create_runner(_spec(root, name, task, {**ORT, "packed": packed}))  # type: ignore[arg-type]
        runner.load()
        graph = runner._classifier.graph_path  # type: ignore[attr-defined]
        inputs = [i.name for i in onnx.load(str(graph)).graph.input]
        assert (inputs == list(PACKED_CLASSIFIER_INPUTS)) == (packed == "true")
        results[packed] = _rerank(runner) if task == "rerank" else _classify(runner)  # type: ignore[arg-type]
    np.testing.assert_allclose(results["true"], results["false"], atol=1e-5, rtol=0)
