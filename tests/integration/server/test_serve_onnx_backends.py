"""``serving.backend: onnxruntime`` on safetensors rerankers, text and image classifiers through
a real ``lmaas serve``: each worker exports its model once into the home's cache and serves
the torch backend's numbers; a backend no runtime offers is refused at import."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    RerankRequest,
    ScoreResult,
    WorkerSpec,
)
from lmaas.core.types import ModelFormat, Task
from lmaas.lifecycle.jobs.common import worker_spec
from lmaas.registry.service import RegistryService
from lmaas.runtimes.classification.torch import TorchTextClassificationRunner
from lmaas.runtimes.rerank.torch import TorchRerankRunner
from lmaas.runtimes.vision.torch import TorchImageClassificationRunner
from lmaas.testing.tiny_onnx import build_tiny_mlp
from lmaas.testing.tiny_text_heads import build_tiny_classifier, build_tiny_cross_encoder
from lmaas.testing.tiny_vision import build_tiny_image_classifier
from tests.integration.serverproc import ServerProcess, start_server

QUERY = "what does a cat eat"
DOCUMENTS = ["Cats eat fish and meat.", "The stock market fell today.", "A cat sat. " * 60]
TEXTS = ["I love this", "This is terrible", "It is a table"]
MODELS = {"rerank-ort": "rerank", "cls-ort": "classification", "vit-ort": "image-classification"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort-backends")
    return {
        "rerank-ort": build_tiny_cross_encoder(root / "rerank", seed=5),
        "cls-ort": build_tiny_classifier(root / "cls", seed=6),
        "vit-ort": build_tiny_image_classifier(root / "vit"),
        "mlp": build_tiny_mlp(root / "mlp.onnx", seed=1),
    }


@pytest.fixture(scope="module")
def ort_server(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]
) -> Iterator[tuple[ServerProcess, Path]]:
    home = tmp_path_factory.mktemp("ort-backends-home")
    cli = [sys.executable, "-m", "lmaas.cli", "models", "import", "--home", str(home)]
    done = subprocess.run(
        [*cli, str(model_dirs["rerank-ort"]), "--name", "rerank-ort", "--backend", "onnxruntime"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    for name in ("cls-ort", "vit-ort"):
        manifest = registry.import_model(
            str(model_dirs[name]), name=name, serving={"backend": "onnxruntime"}
        )
        assert manifest.task == MODELS[name]
    registry.close()
    proc = start_server(home, list(MODELS))
    try:
        proc.wait_ready(300)
        yield proc, home
    finally:
        proc.stop()


def make_spec(model_dir: Path, task: str) -> WorkerSpec:
    """The torch backend's spec of ``model_dir``, loaded in this process as a worker would."""
    return worker_spec("reference", model_dir, Task(task), ModelFormat.SAFETENSORS)


def _post(server: ServerProcess, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_exports_live_in_the_cache_and_metadata_says_float32_cpu(
    ort_server: tuple[ServerProcess, Path],
) -> None:
    server, home = ort_server
    for name in MODELS:
        assert list((home / "cache" / name / "1").glob("onnx-*/model.onnx")), name
        assert not list((home / "models" / name / "1").glob("*.onnx")), name
    cards = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    assert {c["id"]: c["task"] for c in cards} == MODELS


def test_rerank_equals_the_torch_backend(
    ort_server: tuple[ServerProcess, Path], model_dirs: dict[str, Path]
) -> None:
    server, _ = ort_server
    body = {"model": "rerank-ort", "query": QUERY, "documents": DOCUMENTS}
    reply = _post(server, "/v1/rerank", body)
    assert reply.status_code == 200, reply.text
    by_index = {r["index"]: r["relevance_score"] for r in reply.json()["results"]}
    torch_runner = TorchRerankRunner(make_spec(model_dirs["rerank-ort"], "rerank"))
    torch_runner.load()
    [expected] = torch_runner.rerank([RerankRequest("r", QUERY, DOCUMENTS)])
    assert isinstance(expected, ScoreResult)
    np.testing.assert_allclose([by_index[i] for i in range(3)], expected.scores, atol=1e-5)


def test_classify_equals_the_torch_backend(
    ort_server: tuple[ServerProcess, Path], model_dirs: dict[str, Path]
) -> None:
    server, _ = ort_server
    reply = _post(server, "/v1/classify", {"model": "cls-ort", "input": TEXTS})
    assert reply.status_code == 200, reply.text
    got = [d["probs"] for d in reply.json()["data"]]
    torch_runner = TorchTextClassificationRunner(make_spec(model_dirs["cls-ort"], "classification"))
    torch_runner.load()
    [expected] = torch_runner.classify([ClassifyRequest("c", texts=TEXTS)])
    assert isinstance(expected, ClassifyResult)
    want = np.frombuffer(expected.probs, "<f4").reshape(len(TEXTS), -1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    bad = _post(server, "/v1/classify", {"model": "cls-ort", "input": [""]})
    assert bad.status_code == 400


def test_image_classify_equals_the_torch_backend(
    ort_server: tuple[ServerProcess, Path], model_dirs: dict[str, Path]
) -> None:
    server, _ = ort_server
    files = [_png(3), _png(4, (64, 16))]
    urls = [f"data:image/png;base64,{base64.b64encode(f).decode()}" for f in files]
    reply = _post(server, "/v1/classify", {"model": "vit-ort", "input": urls})
    assert reply.status_code == 200, reply.text
    got = [d["probs"] for d in reply.json()["data"]]
    torch_runner = TorchImageClassificationRunner(
        make_spec(model_dirs["vit-ort"], "image-classification")
    )
    torch_runner.load()
    expected = torch_runner.classify(ClassifyRequest("i", images=files))
    want = np.frombuffer(expected.probs, "<f4").reshape(len(files), -1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_backend_no_runtime_offers_is_refused_at_import(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cli = [sys.executable, "-m", "lmaas.cli", "models", "import", "--home", str(tmp_path)]
    done = subprocess.run(
        [*cli, str(model_dirs["mlp"]), "--backend", "torch"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "tensor models in onnx format cannot run on torch" in done.stderr
    assert "use serving.backend auto or onnxruntime" in done.stderr
    assert "Traceback" not in done.stderr
