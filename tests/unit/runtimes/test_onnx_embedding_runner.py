"""OnnxEmbeddingRunner against sentence-transformers and the torch runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from runtimes_helpers import make_spec
from sentence_transformers import SentenceTransformer

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import EmbedRequest, EmbedResult, RequestError
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.embedding.onnx import OnnxEmbeddingRunner
from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner
from lmaas.runtimes.onnx_export import PACKED_ENCODER_INPUTS
from lmaas.testing.tiny_models import build_tiny_embedder

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "  Café, naïve and Zürich 🙂  ",
    "A cat sat on the mat. " * 40,  # over max_seq_length (128): truncated
    "Embeddings map sentences to vectors.",
]


def _matrix(result: EmbedResult | RequestError) -> np.ndarray:
    assert isinstance(result, EmbedResult), result
    return np.frombuffer(result.data, dtype="<f4").reshape(result.num_inputs, result.dim)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed(runner: OnnxEmbeddingRunner | TorchEmbeddingRunner) -> np.ndarray:
    requests = [EmbedRequest("a", texts=TEXTS[:3]), EmbedRequest("b", texts=TEXTS[3:])]
    return np.concatenate([_matrix(r) for r in runner.embed(requests)])


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OnnxEmbeddingRunner]:
    """A tiny safetensors embedder served with backend onnxruntime (exported once)."""
    root = tmp_path_factory.mktemp("onnx-embed")
    model_dir = build_tiny_embedder(root / "model", seed=3)
    spec = make_spec(
        model_dir,
        task="embedding",
        max_batch_size=2,
        options={"backend": "onnxruntime"},
        cache_dir=str(root / "cache"),
    )
    runner = create_runner(spec)
    assert isinstance(runner, OnnxEmbeddingRunner)
    runner.load()
    return root, runner


def test_export_matches_sentence_transformers_and_torch(
    exported: tuple[Path, OnnxEmbeddingRunner],
) -> None:
    root, runner = exported
    model_dir = root / "model"
    got = _embed(runner)
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True
    )
    assert got.shape == expected.shape == (5, 64)
    assert _cosines(got, expected).min() >= 1 - 1e-5
    np.testing.assert_allclose(got, expected, atol=1e-5)
    torch_runner = TorchEmbeddingRunner(make_spec(model_dir, task="embedding"))
    torch_runner.load()
    np.testing.assert_allclose(got, _embed(torch_runner), atol=1e-5)


def test_export_goes_to_the_cache_and_is_reused(exported: tuple[Path, OnnxEmbeddingRunner]) -> None:
    root, runner = exported
    graph = runner.graph_path
    assert graph is not None and graph.is_relative_to(root / "cache")
    assert not list((root / "model").glob("*.onnx"))  # the version directory is untouched
    mtime = graph.stat().st_mtime_ns
    again = OnnxEmbeddingRunner(
        make_spec(root / "model", task="embedding", cache_dir=str(root / "cache"))
    )
    again.load()
    assert again.graph_path == graph and graph.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("recipe", "op_type"),
    [("int8", "MatMulIntegerToFloat"), ("int8-dynamic", "DynamicQuantizeLinear")],
)
def test_int8_is_close_to_fp32(
    exported: tuple[Path, OnnxEmbeddingRunner], recipe: str, op_type: str
) -> None:
    import onnx

    root, runner = exported
    spec = make_spec(
        root / "model",
        task="embedding",
        options={"backend": "onnxruntime", "quantize": recipe},
        cache_dir=str(root / "cache"),
    )
    int8 = OnnxEmbeddingRunner(spec)
    assert int8.load().dtype == "int8"
    assert int8.graph_path is not None and int8.graph_path.name == "model.int8.onnx"
    assert int8.graph_path.parent.name.startswith(f"{recipe}-")  # one cached graph per recipe
    graph = onnx.load(str(int8.graph_path))
    assert op_type in {node.op_type for node in graph.graph.node}
    assert _cosines(_embed(int8), _embed(runner)).min() >= 0.99


def test_int8_on_an_empty_cache_exports_the_float_weights(
    exported: tuple[Path, OnnxEmbeddingRunner], tmp_path: Path
) -> None:
    """The export must not read ``quantize`` (it once loaded torch-int8 weights and failed)."""
    root, runner = exported
    spec = make_spec(
        root / "model",
        task="embedding",
        options={"backend": "onnxruntime", "quantize": "int8"},
        cache_dir=str(tmp_path / "empty-cache"),
    )
    int8 = OnnxEmbeddingRunner(spec)
    assert int8.load().dtype == "int8"
    assert _cosines(_embed(int8), _embed(runner)).min() >= 0.99


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("max", False)])
def test_imported_model_onnx_with_other_poolings(
    exported: tuple[Path, OnnxEmbeddingRunner], tmp_path: Path, pooling: str, normalize: bool
) -> None:
    """An ``onnx``-format directory (model.onnx beside the tokenizer) runs as it is."""
    _, runner = exported
    model_dir = build_tiny_embedder(tmp_path / "m", seed=3, pooling=pooling, normalize=normalize)
    assert runner.graph_path is not None
    shutil.copy(runner.graph_path, model_dir / "model.onnx")
    spec = make_spec(model_dir, task="embedding", format="onnx")
    onnx_runner = create_runner(spec)
    assert isinstance(onnx_runner, OnnxEmbeddingRunner)
    onnx_runner.load()
    assert onnx_runner.graph_path == model_dir / "model.onnx"
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(
        TEXTS, normalize_embeddings=normalize, convert_to_numpy=True
    )
    assert _cosines(_embed(onnx_runner), expected).min() >= 1 - 1e-5


@pytest.mark.parametrize(
    "request_",
    [
        EmbedRequest("bad", texts=[]),
        EmbedRequest("bad", texts=["fine", ""]),
        EmbedRequest("bad", token_ids=[[2, 100_000]]),
        EmbedRequest("bad"),
    ],
)
def test_bad_inputs_fail_only_their_request(
    exported: tuple[Path, OnnxEmbeddingRunner], request_: EmbedRequest
) -> None:
    _, runner = exported
    good, bad = runner.embed([EmbedRequest("good", texts=["hello"]), request_])
    assert isinstance(good, EmbedResult) and good.num_inputs == 1
    assert isinstance(bad, RequestError) and (bad.code, bad.param) == ("invalid_request", "input")


def test_bad_options_and_graphs_are_load_errors(tmp_path: Path) -> None:
    model_dir = build_tiny_embedder(tmp_path / "m")
    options = {"backend": "onnxruntime", "quantize": "int3"}
    with pytest.raises(ModelLoadError, match="quantize"):
        OnnxEmbeddingRunner(make_spec(model_dir, task="embedding", options=options)).load()
    with pytest.raises(ModelLoadError, match=r"no model\.onnx"):
        OnnxEmbeddingRunner(make_spec(model_dir, task="embedding", format="onnx")).load()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_export_runs_packed_rows_unless_told_not_to(tmp_path: Path, family: str) -> None:
    """Packed families export a packed graph (no padding in its linear layers); the option
    ``packed=false`` exports the padded one; both equal the torch runner."""
    import onnx

    model_dir = build_tiny_embedder(tmp_path / family, seed=7, family=family)
    vectors = {}
    for packed in ("true", "false"):
        options = {"backend": "onnxruntime", "packed": packed}
        runner = OnnxEmbeddingRunner(
            make_spec(model_dir, task="embedding", options=options, cache_dir=str(tmp_path / "c"))
        )
        runner.load()
        assert runner.graph_path is not None
        inputs = [i.name for i in onnx.load(str(runner.graph_path)).graph.input]
        assert inputs == (
            list(PACKED_ENCODER_INPUTS) if packed == "true" else ["input_ids", "attention_mask"]
        )
        vectors[packed] = _embed(runner)
    torch_runner = TorchEmbeddingRunner(make_spec(model_dir, task="embedding"))
    torch_runner.load()
    np.testing.assert_allclose(vectors["true"], _embed(torch_runner), atol=1e-5)
    np.testing.assert_allclose(vectors["true"], vectors["false"], atol=1e-5)


def test_int8_of_a_packed_graph_is_calibrated_on_packed_rows(
    exported: tuple[Path, OnnxEmbeddingRunner],
) -> None:
    import onnx

    from lmaas.runtimes.onnx_int8 import _calibration_feeds

    _, runner = exported
    assert runner.graph_path is not None
    feeds = _calibration_feeds(onnx.load(str(runner.graph_path)))
    assert feeds is not None and set(feeds[0]) == set(PACKED_ENCODER_INPUTS)
    import onnxruntime as ort

    session = ort.InferenceSession(str(runner.graph_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, feeds[-1])
    assert out.shape == (feeds[-1]["input_ids"].shape[1], 64)
