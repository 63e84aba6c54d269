"""Train, compress and convert a digits classifier with the real CLI, then serve every version.

The training run is scaled down for the suite (one transformer layer, width 64, 8 epochs: a few
seconds); `lmaas train image-classifier --sklearn-digits` with its defaults is measured in
docs/lifecycle-train.md. The accuracy bar (>= 0.95 held out) holds for both.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from lmaas.core.messages import ClassifyRequest
from lmaas.lifecycle import data as datasets
from lmaas.lifecycle.jobs import compress, convert, train
from lmaas.lifecycle.jobs.common import VersionProbe, image_requests, png_bytes, version_spec
from lmaas.registry.manifest import Manifest
from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_text_heads import build_tiny_classifier
from tests.integration.cli_jobs import interrupt_after_first_epoch
from tests.integration.serverproc import ServerProcess, start_server

SUITE_TRAINING = ["--epochs", "8", "--hidden-size", "64", "--layers", "1", "--lr", "2e-3"]


def _registry(home: Path) -> RegistryService:
    return RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmaas.cli", *args, "--home", str(home)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def _job_args(home: Path) -> list[str]:
    return ["--home", str(home), "--database-url", f"sqlite:///{home / 'lmaas.db'}"]


def _metrics(manifest: Manifest) -> dict[str, float]:
    return {m.metric: m.value for m in manifest.metrics}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits:1 trained through the CLI, digits-int8:1 and digits-onnx:1 made from it, and
    digits-ort8:1 (onnxruntime int8) from digits-onnx:1."""
    home = tmp_path_factory.mktemp("lifecycle-home")
    trained = _cli(
        home, "train", "image-classifier", "--sklearn-digits", "--name", "digits", *SUITE_TRAINING
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "registered digits:1" in trained.stdout
    # The CLI only checks arguments and runs these same job modules in a child process: run
    # them in-process here to spare the suite two more torch start-ups.
    assert compress.main(["digits:1", "--int8", "--name", "digits-int8", *_job_args(home)]) == 0
    assert convert.main(["digits:1", "--onnx", "--name", "digits-onnx", *_job_args(home)]) == 0
    ort8 = ["digits-onnx", "--int8", "--all-layers", "--name", "digits-ort8", *_job_args(home)]
    assert compress.main(ort8) == 0
    return home


def test_training_reaches_the_accuracy_bar_and_records_lineage(home: Path) -> None:
    with _registry(home) as registry:
        manifest = registry.get("digits", "1")
    metrics = _metrics(manifest)
    assert metrics["accuracy"] >= 0.95
    assert metrics["test_examples"] == 359
    assert manifest.task.value == "image-classification"
    assert manifest.labels == [str(i) for i in range(10)]
    assert manifest.lineage is not None and manifest.lineage.parent is None
    assert manifest.lineage.transform == "train"
    params = manifest.lineage.parameters
    assert params["data"] == datasets.DIGITS_SOURCE and params["epochs"] == 8
    assert 1 <= params["best_epoch"] <= params["epochs_run"] <= 8


def test_int8_version_is_at_least_twice_smaller_and_as_accurate(home: Path) -> None:
    with _registry(home) as registry:
        parent, child = registry.get("digits", "1"), registry.get("digits-int8")
    metrics = _metrics(child)
    assert parent.size_bytes / child.size_bytes >= 2.0
    assert metrics["size_ratio"] >= 2.0
    assert metrics["accuracy_delta"] >= -0.01
    assert metrics["accuracy"] >= 0.94
    assert metrics["latency_ms"] > 0 and metrics["parent_latency_ms"] > 0
    assert {f.path for f in child.files} >= {"model.int8.safetensors", "config.json"}
    assert "model.safetensors" not in {f.path for f in child.files}
    assert child.serving.options["quantize"] == "int8"
    assert child.lineage is not None and child.lineage.parent == "digits:1"
    assert child.lineage.transform == "quantize-int8"


def test_onnx_version_meets_parity(home: Path) -> None:
    with _registry(home) as registry:
        child = registry.get("digits-onnx")
    metrics = _metrics(child)
    assert child.format.value == "onnx" and child.task.value == "image-classification"
    assert metrics["parity_max_abs_diff"] <= 1e-4
    assert metrics["parity_top1_agreement"] == 1.0
    assert abs(metrics["accuracy_delta"]) < 1e-9
    assert child.lineage is not None and child.lineage.transform == "onnx-export"


def test_onnxruntime_int8_version_is_twice_smaller_and_as_accurate(home: Path) -> None:
    with _registry(home) as registry:
        parent, child = registry.get("digits-onnx"), registry.get("digits-ort8")
    metrics = _metrics(child)
    assert child.format.value == "onnx"
    assert parent.size_bytes / child.size_bytes >= 2.0
    assert metrics["accuracy_delta"] >= -0.01
    assert metrics["latency_ms"] > 0 and metrics["parent_latency_ms"] > 0
    assert child.lineage is not None and child.lineage.parent == "digits-onnx:1"
    assert child.lineage.transform == "quantize-int8"
    assert child.lineage.parameters["backend"] == "onnxruntime"
    assert child.lineage.parameters["gelu_fed_matmuls"] == "int8"
    assert child.lineage.parameters["convolutions"] == "int8"


def test_failed_parity_check_creates_no_version(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _registry(home) as registry:
        before = [m.ref for m in registry.list_models()]
    code = convert.main(
        ["digits:1", "--onnx", "--name", "digits-strict", "--max-abs-diff", "0", *_job_args(home)]
    )
    assert code == 1
    assert "parity check failed" in capsys.readouterr().err
    with _registry(home) as registry:
        assert [m.ref for m in registry.list_models()] == before


def test_pruning_reaches_its_sparsity(home: Path) -> None:
    code = compress.main(
        ["digits:1", "--prune", "0.3", "--name", "digits-pruned", *_job_args(home)]
    )
    assert code == 0
    with _registry(home) as registry:
        child = registry.get("digits-pruned")
    metrics = _metrics(child)
    assert 0.29 <= metrics["sparsity"] <= 0.31
    assert metrics["accuracy_delta"] >= -0.05
    assert child.lineage is not None and child.lineage.parameters["fine_tune"] is False


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ServerProcess]:
    proc = start_server(home, ["digits:1", "digits-int8", "digits-onnx", "digits-ort8"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("name", ["digits", "digits-int8", "digits-onnx", "digits-ort8"])
def test_served_predictions_equal_the_evaluation(
    home: Path, server: ServerProcess, name: str
) -> None:
    data = datasets.load_digits_images()
    test = datasets.split(len(data.labels), test_fraction=0.2, val_fraction=0.15, seed=0).test[:12]
    with _registry(home) as registry:
        manifest = registry.get(name, "1")
        expected = VersionProbe(version_spec(registry, manifest)).probabilities(
            image_requests(data, test)
        )
    encoded = [base64.b64encode(png_bytes(data.images[i])).decode() for i in test]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [12], "data": encoded}]}
    reply = httpx.post(f"{server.base_url}/v2/models/{name}/infer", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["label"]["data"] == [str(i) for i in expected.argmax(axis=1)]
    served = np.array(outputs["probabilities"]["data"]).reshape(12, 10)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    accuracy = (expected.argmax(axis=1) == [data.labels[i] for i in test]).mean()
    assert accuracy >= 0.8  # 12 held-out digits: a sanity check, the bar is on all 359


def test_text_classifier_fine_tunes_a_registered_encoder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with _registry(home) as registry:
        base = registry.import_model(str(build_tiny_classifier(tmp_path / "base")), name="base")
    rows = [{"text": f"the cat sat on the mat {i}", "label": "cat"} for i in range(12)]
    rows += [{"text": f"a dog ran in the park {i}", "label": "dog"} for i in range(12)]
    data = tmp_path / "pets.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = train.main(
        ["text-classifier", "--data", str(data), "--base", "base", "--name", "pets",
         "--epochs", "3", "--lr", "1e-3", *_job_args(home)]
    )  # fmt: skip
    assert code == 0
    with _registry(home) as registry:
        pets = registry.get("pets")
        probs = VersionProbe(version_spec(registry, pets)).probabilities(
            [ClassifyRequest("r", texts=["a cat"])]
        )
    assert pets.task.value == "classification" and pets.labels == ["cat", "dog"]
    assert pets.lineage is not None and pets.lineage.parent == base.ref
    assert "accuracy" in _metrics(pets)
    assert probs.shape == (1, 2) and abs(float(probs.sum()) - 1.0) < 1e-5
    # The text classifier compresses too, and the classification runtime serves it in int8.
    assert compress.main(["pets", "--int8", *_job_args(home)]) == 0
    with _registry(home) as registry:
        pets8 = registry.get("pets", "2")
        probe = VersionProbe(version_spec(registry, pets8))
    assert probe.info.dtype == "int8"
    assert pets8.lineage is not None and pets8.lineage.parent == "pets:1"
    assert {"accuracy_delta", "size_ratio"} <= set(_metrics(pets8))


def test_ctrl_c_cancels_training_and_registers_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    command = [
        sys.executable, "-m", "lmaas.cli", "train", "image-classifier", "--sklearn-digits",
        "--name", "cancelled", "--epochs", "200", "--patience", "200", "--home", str(home),
    ]  # fmt: skip
    rest = interrupt_after_first_epoch(command)
    assert "no version was registered" in rest
    with _registry(home) as registry:
        assert registry.list_models() == []
