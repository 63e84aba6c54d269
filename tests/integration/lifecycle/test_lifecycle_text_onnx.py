"""ONNX conversion of text classifiers and cross-encoders, onnxruntime int8, served for real.

Tiny random-weight BERTs (:mod:`lmaas.testing.tiny_text_heads`): the numbers mean nothing, but
every step is the real one: the CLI converts, the parity check runs, the versions are
registered, and a real `lmaas serve` returns the parent's predictions from the ONNX versions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from lmaas.core.messages import ClassifyRequest
from lmaas.lifecycle.jobs import compress, convert
from lmaas.lifecycle.jobs.common import VersionProbe, version_spec
from lmaas.registry.manifest import Manifest
from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_models import build_tiny_embedder
from lmaas.testing.tiny_text_heads import (
    CLASSIFIER_LABELS,
    build_tiny_classifier,
    build_tiny_cross_encoder,
    write_labelled_texts,
)
from tests.integration.serverproc import ServerProcess, start_server

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park with a very long and winding sentence about nothing much",
    "good",
    "an awful film",
]
QUERY = "where did the cat sit"
DOCUMENTS = ["the cat sat on the mat", "dogs bark at night", "a mat is a small rug"]


def _registry(home: Path) -> RegistryService:
    return RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)


def _job_args(home: Path) -> list[str]:
    return ["--home", str(home), "--database-url", f"sqlite:///{home / 'lmaas.db'}"]


def _metrics(manifest: Manifest) -> dict[str, float]:
    return {m.metric: m.value for m in manifest.metrics}


def _labelled(path: Path) -> Path:
    return write_labelled_texts(path, per_label=12)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cls, ce, emb (tiny torch models), cls-onnx, ce-onnx, emb-onnx (converted), cls-int8."""
    root = tmp_path_factory.mktemp("text-onnx")
    home = root / "home"
    with _registry(home) as registry:
        registry.import_model(str(build_tiny_classifier(root / "cls", seed=6)), name="cls")
        registry.import_model(str(build_tiny_cross_encoder(root / "ce", seed=1)), name="ce")
        registry.import_model(str(build_tiny_embedder(root / "emb", seed=0)), name="emb")
    data = _labelled(root / "labelled.jsonl")
    converted = subprocess.run(
        [sys.executable, "-m", "lmaas.cli", "convert", "cls", "--onnx", "--name", "cls-onnx",
         "--data", str(data), "--home", str(home)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "registered cls-onnx:1 from cls:1" in converted.stdout
    # The CLI runs these same job modules in a child process: in-process spares torch start-ups.
    assert convert.main(["ce", "--onnx", "--name", "ce-onnx", *_job_args(home)]) == 0
    assert convert.main(["emb", "--onnx", "--name", "emb-onnx", *_job_args(home)]) == 0
    int8 = ["cls-onnx", "--int8", "--name", "cls-int8", "--data", str(data), *_job_args(home)]
    assert compress.main(int8) == 0
    return home


def test_text_classifier_version_meets_parity_with_lineage(home: Path) -> None:
    with _registry(home) as registry:
        child = registry.get("cls-onnx")
    metrics = _metrics(child)
    assert child.format.value == "onnx" and child.task.value == "classification"
    assert child.labels == list(CLASSIFIER_LABELS)
    assert metrics["parity_max_abs_diff"] <= 1e-4
    assert metrics["parity_top1_agreement"] == 1.0
    assert abs(metrics["accuracy_delta"]) < 1e-9  # same predictions on the 36 labelled texts
    assert metrics["size_bytes"] > 0 and metrics["latency_ms"] > 0
    assert child.lineage is not None and child.lineage.parent == "cls:1"
    assert child.lineage.transform == "onnx-export"
    assert child.lineage.parameters["samples"] == 36
    assert "model.onnx" in {f.path for f in child.files}
    assert not any(f.path.endswith(".safetensors") for f in child.files)


def test_cross_encoder_version_meets_parity_on_random_pairs(home: Path) -> None:
    with _registry(home) as registry:
        child = registry.get("ce-onnx")
    metrics = _metrics(child)
    assert child.format.value == "onnx" and child.task.value == "rerank"
    assert metrics["parity_max_abs_diff"] <= 1e-4 and metrics["parity_top1_agreement"] == 1.0
    assert child.lineage is not None and child.lineage.parameters["sample_source"] == "random"
    assert child.lineage.parameters["samples"] == 64


def test_embedding_version_meets_parity_on_served_vectors(home: Path) -> None:
    with _registry(home) as registry:
        child = registry.get("emb-onnx")
    metrics = _metrics(child)
    assert child.format.value == "onnx" and child.task.value == "embedding"
    assert metrics["parity_max_abs_diff"] <= 1e-4
    assert metrics["parity_cosine_agreement"] == 1.0
    assert child.lineage is not None and child.lineage.parent == "emb:1"
    assert child.lineage.parameters["samples"] == 64 + 4  # random texts + the very short ones
    assert "model.onnx" in {f.path for f in child.files}
    assert not any(f.path.endswith(".safetensors") for f in child.files)


def test_onnxruntime_int8_records_size_latency_and_accuracy_delta(home: Path) -> None:
    with _registry(home) as registry:
        parent, child = registry.get("cls-onnx"), registry.get("cls-int8")
    metrics = _metrics(child)
    assert child.format.value == "onnx"
    assert child.lineage is not None and child.lineage.parent == "cls-onnx:1"
    assert child.lineage.transform == "quantize-int8"
    assert child.lineage.parameters["backend"] == "onnxruntime"
    # Most of this tiny BERT is its embedding tables (a Gather: not quantised); the Linears are.
    assert child.size_bytes < parent.size_bytes
    assert metrics["size_ratio"] == pytest.approx(parent.size_bytes / child.size_bytes)
    assert {"accuracy", "accuracy_delta", "parent_accuracy", "latency_ms"} <= set(metrics)
    assert metrics["parent_size_bytes"] == parent.size_bytes


def test_compressing_a_version_served_on_onnxruntime(home: Path, tmp_path: Path) -> None:
    """int8 torch weights cannot be exported: the child is served (and measured) on torch; a
    pruned child keeps the parent's onnxruntime backend and is measured on it."""
    model_dir = build_tiny_classifier(tmp_path / "cls", seed=6)
    with _registry(home) as registry:
        registry.import_model(str(model_dir), name="cls-ort", serving={"backend": "onnxruntime"})
    data = str(_labelled(tmp_path / "labelled.jsonl"))
    int8 = ["cls-ort", "--int8", "--name", "cls-ort-int8", "--data", data, *_job_args(home)]
    assert compress.main(int8) == 0
    prune = ["cls-ort", "--prune", "0.3", "--name", "cls-ort-pruned", "--data", data]
    assert compress.main([*prune, *_job_args(home)]) == 0
    with _registry(home) as registry:
        quantized, pruned = registry.get("cls-ort-int8"), registry.get("cls-ort-pruned")
        assert quantized.serving.backend == "torch"
        assert pruned.serving.backend == "onnxruntime"
        assert VersionProbe(version_spec(registry, quantized)).info.dtype == "int8"  # torch
        assert VersionProbe(version_spec(registry, pruned)).info.dtype == "float32"


def test_failed_text_parity_creates_no_version(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _registry(home) as registry:
        before = [m.ref for m in registry.list_models()]
    strict = ["cls", "--onnx", "--name", "cls-strict", "--max-abs-diff", "0", "--samples", "8"]
    assert convert.main([*strict, *_job_args(home)]) == 1
    assert "parity check failed" in capsys.readouterr().err
    with _registry(home) as registry:
        assert [m.ref for m in registry.list_models()] == before


def test_bad_inputs_get_clear_errors(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labelled = ["--data", str(tmp_path / "x.jsonl")]
    assert convert.main(["emb", "--onnx", *labelled, *_job_args(home)]) == 1
    assert "parity runs on sample texts, not labelled data" in capsys.readouterr().err
    assert compress.main(["cls-onnx", "--prune", "0.3", *_job_args(home)]) == 1
    assert "pruning needs the torch weights" in capsys.readouterr().err
    assert compress.main(["cls-int8", "--int8", *_job_args(home)]) == 1
    assert "already int8" in capsys.readouterr().err
    assert compress.main(["ce-onnx", "--int8", *_job_args(home)]) == 1
    assert "compression supports classification and image-classification" in (
        capsys.readouterr().err
    )
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "a", "label": "cat"}\n{"text": "b", "label": "dog"}\n')
    assert convert.main(["cls", "--onnx", "--data", str(wrong), *_job_args(home)]) == 1
    assert "labels cls:1 does not know: cat, dog" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ServerProcess]:
    proc = start_server(home, ["cls", "cls-onnx", "cls-int8", "ce", "ce-onnx", "emb", "emb-onnx"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _classify(server: ServerProcess, model: str) -> list[dict[str, object]]:
    body = {"model": model, "input": TEXTS}
    reply = httpx.post(f"{server.base_url}/v1/classify", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data: list[dict[str, object]] = reply.json()["data"]
    return data


def test_served_onnx_classifier_equals_the_torch_version(server: ServerProcess) -> None:
    torch_data, onnx_data = _classify(server, "cls"), _classify(server, "cls-onnx")
    assert [d["label"] for d in onnx_data] == [d["label"] for d in torch_data]
    np.testing.assert_allclose(
        [d["probs"] for d in onnx_data], [d["probs"] for d in torch_data], atol=1e-5, rtol=0
    )


def test_served_int8_classifier_equals_its_evaluation(home: Path, server: ServerProcess) -> None:
    with _registry(home) as registry:
        probe = VersionProbe(version_spec(registry, registry.get("cls-int8")))
    expected = probe.probabilities([ClassifyRequest("r", texts=TEXTS)])
    served = _classify(server, "cls-int8")
    np.testing.assert_allclose([d["probs"] for d in served], expected, atol=1e-5, rtol=0)
    assert [d["label"] for d in served] == [CLASSIFIER_LABELS[i] for i in expected.argmax(1)]


def test_served_onnx_reranker_equals_the_torch_version(server: ServerProcess) -> None:
    scores = {}
    for model in ("ce", "ce-onnx"):
        body = {"model": model, "query": QUERY, "documents": DOCUMENTS}
        reply = httpx.post(f"{server.base_url}/v1/rerank", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        scores[model] = {r["index"]: r["relevance_score"] for r in reply.json()["results"]}
    np.testing.assert_allclose(
        [scores["ce-onnx"][i] for i in range(3)], [scores["ce"][i] for i in range(3)], atol=1e-5
    )


def test_served_onnx_embedding_equals_the_torch_version(server: ServerProcess) -> None:
    vectors = {}
    for model in ("emb", "emb-onnx"):
        body = {"model": model, "input": TEXTS}
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        vectors[model] = [d["embedding"] for d in reply.json()["data"]]
    np.testing.assert_allclose(vectors["emb-onnx"], vectors["emb"], atol=1e-5, rtol=0)
