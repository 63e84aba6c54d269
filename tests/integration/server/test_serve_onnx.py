"""ONNX models through a real `lmaas serve`: v2 tensor inference and an onnxruntime embedder."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from openai import OpenAI
from sentence_transformers import SentenceTransformer

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_models import build_tiny_embedder
from lmaas.testing.tiny_onnx import build_tiny_bf16, build_tiny_mlp, build_tiny_two_io
from tests.integration.serverproc import ServerProcess, start_server

tritonhttp = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-models")
    return {
        "mlp": build_tiny_mlp(root / "mlp.onnx", seed=1),
        "two": build_tiny_two_io(root / "two-io.onnx", seed=2),
        "bf16": build_tiny_bf16(root / "bf16.onnx", seed=3),
        "embed": build_tiny_embedder(root / "embed", seed=4),
    }


@pytest.fixture(scope="module")
def onnx_server(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[tuple[ServerProcess, Path]]:
    home = tmp_path_factory.mktemp("onnx-home")
    for source in (models["mlp"], models["two"], models["bf16"]):
        cli = [sys.executable, "-m", "lmaas.cli", "models", "import", str(source)]
        done = subprocess.run(
            [*cli, "--task", "tensor", "--home", str(home)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "(tensor, onnx," in done.stdout
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    registry.import_model(
        str(models["embed"]), name="embed-ort", serving={"backend": "onnxruntime"}
    )
    registry.close()
    proc = start_server(home, ["mlp", "two-io", "bf16", "embed-ort"])
    try:
        proc.wait_ready(240)
        yield proc, home
    finally:
        proc.stop()


def _reference(graph: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, feeds)]


def test_metadata_lists_the_graph_signature(onnx_server: tuple[ServerProcess, Path]) -> None:
    server, _ = onnx_server
    meta = httpx.get(f"{server.base_url}/v2/models/two-io").json()
    assert meta["platform"] == "lmaas_tensor"
    assert meta["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "offset", "datatype": "INT64", "shape": [-1, 2]},
    ]
    assert meta["outputs"] == [
        {"name": "scaled", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    models = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    assert {m["id"] for m in models} >= {"mlp", "two-io", "embed-ort"}


def test_tritonclient_binary_and_json_match_onnxruntime(
    onnx_server: tuple[ServerProcess, Path], models: dict[str, Path]
) -> None:
    server, _ = onnx_server
    client = tritonhttp.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, 4)).astype(np.float32)
    offset = rng.integers(-5, 5, (3, 2)).astype(np.int64)
    scaled, label = _reference(models["two"], {"features": features, "offset": offset})
    for binary in (True, False):
        inputs = [
            tritonhttp.InferInput("features", [3, 4], "FP32"),
            tritonhttp.InferInput("offset", [3, 2], "INT64"),
        ]
        inputs[0].set_data_from_numpy(features, binary_data=binary)
        inputs[1].set_data_from_numpy(offset, binary_data=binary)
        outputs = [tritonhttp.InferRequestedOutput("label", binary_data=binary)]
        result = client.infer("two-io", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("label"), label)
        assert result.as_numpy("scaled") is None  # only what was asked for
        full = client.infer("two-io", inputs)
        np.testing.assert_allclose(full.as_numpy("scaled"), scaled, rtol=1e-6)


def test_tritonclient_bf16_binary_matches_onnxruntime(
    onnx_server: tuple[ServerProcess, Path], models: dict[str, Path]
) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")  # tritonclient's own BF16 numpy type
    server, _ = onnx_server
    client = tritonhttp.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    meta = client.get_model_metadata("bf16")
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("y", "BF16"), ("z", "FP32")]
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    session = ort.InferenceSession(str(models["bf16"]), providers=["CPUExecutionProvider"])
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(np.uint16), onnx_element_type=16)
    (z_ref,) = [v.numpy() for v in session.run_with_ort_values(["z"], {"x": feed})]
    given = tritonhttp.InferInput("x", [4, 3], "BF16")
    given.set_data_from_numpy(x, binary_data=True)
    wanted = [tritonhttp.InferRequestedOutput(n, binary_data=True) for n in ("y", "z")]
    result = client.infer("bf16", [given], outputs=wanted)
    y, z = result.as_numpy("y"), result.as_numpy("z")
    assert y.dtype == ml_dtypes.bfloat16 and y.shape == (4, 3)
    np.testing.assert_array_equal(z, z_ref)
    np.testing.assert_array_equal(y, z_ref.astype(ml_dtypes.bfloat16))
    # JSON is refused for BF16 (client side for inputs; server side for outputs).
    with pytest.raises(InferenceServerException, match="binary data"):
        given.set_data_from_numpy(x, binary_data=False)
    given.set_data_from_numpy(x, binary_data=True)
    json_out = [tritonhttp.InferRequestedOutput("y", binary_data=False)]
    with pytest.raises(InferenceServerException, match="output 'y' is BF16"):
        client.infer("bf16", [given], outputs=json_out)


def test_concurrent_json_requests_are_batched_correctly(
    onnx_server: tuple[ServerProcess, Path], models: dict[str, Path]
) -> None:
    server, _ = onnx_server
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 2, 3, 4) * 4]

    def infer(x: np.ndarray) -> httpx.Response:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                            "data": x.tolist()}]}  # fmt: skip
        return httpx.post(f"{server.base_url}/v2/models/mlp/infer", json=body, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(infer, batches))
    for reply, x in zip(replies, batches, strict=True):
        assert reply.status_code == 200, reply.text
        (out,) = reply.json()["outputs"]
        (expected,) = _reference(models["mlp"], {"x": x})
        assert out["name"] == "y" and out["shape"] == [len(x), 3]
        np.testing.assert_allclose(np.array(out["data"]).reshape(-1, 3), expected, rtol=1e-5)


def _features(shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    count = int(np.prod(shape))
    value: float | int = 1.0 if datatype.startswith("FP") else 1
    return {"name": "features", "datatype": datatype, "shape": shape, "data": [value] * count}


def _offset(shape: list[int]) -> dict[str, Any]:
    return {
        "name": "offset",
        "datatype": "INT64",
        "shape": shape,
        "data": [1] * int(np.prod(shape)),
    }


@pytest.mark.parametrize(
    ("inputs", "outputs", "needle"),
    [
        ([_features([1, 4])], None, "missing input 'offset'"),
        ([_features([1, 4]), _offset([1, 2]), {**_offset([1, 2]), "name": "bias"}], None,
         "unknown input 'bias'"),
        ([_features([1, 4], "INT32"), _offset([1, 2])], None, "input 'features' must be FP32"),
        ([_features([4]), _offset([1, 2])], None, "input 'features' must have 2 dimensions"),
        ([_features([1, 4]), _offset([1, 3])], None, "input 'offset' has shape [1, 3]"),
        ([_features([2, 4]), _offset([3, 2])], None, "cannot run on these inputs"),
        ([_features([1, 4]), _offset([1, 2])], [{"name": "nope"}], "unknown output 'nope'"),
    ],
)  # fmt: skip
def test_bad_inputs_are_400_and_the_worker_stays_up(
    onnx_server: tuple[ServerProcess, Path],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]] | None,
    needle: str,
) -> None:
    server, _ = onnx_server
    url = f"{server.base_url}/v2/models/two-io/infer"
    body: dict[str, Any] = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    bad = httpx.post(url, json=body, timeout=30)
    assert bad.status_code == 400, bad.text
    assert needle in bad.json()["error"]
    good = httpx.post(url, json={"inputs": [_features([2, 4]), _offset([2, 2])]}, timeout=30)
    assert good.status_code == 200, good.text
    assert [o["name"] for o in good.json()["outputs"]] == ["scaled", "label"]


def test_embeddings_on_onnxruntime_match_sentence_transformers(
    onnx_server: tuple[ServerProcess, Path], models: dict[str, Path]
) -> None:
    server, home = onnx_server
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    sentences = ["Large models as a service.", "The quick brown fox jumps over the lazy dog."]
    served = client.embeddings.create(model="embed-ort", input=sentences)
    ours = np.array([d.embedding for d in served.data], dtype=np.float32)
    reference = SentenceTransformer(str(models["embed"]), device="cpu").encode(
        sentences, normalize_embeddings=True
    )
    cosine = (ours * reference).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 1 - 1e-5
    # The export lives in the home's cache, never in the immutable version directory.
    assert list((home / "cache" / "embed-ort" / "1").glob("onnx-*/model.onnx"))
    assert not list((home / "models" / "embed-ort" / "1").glob("*.onnx"))
    bad = httpx.post(
        f"{server.base_url}/v1/embeddings", json={"model": "embed-ort", "input": [""]}, timeout=30
    )
    assert bad.status_code == 400
    again = client.embeddings.create(model="embed-ort", input="still up")
    assert len(again.data[0].embedding) == 64
