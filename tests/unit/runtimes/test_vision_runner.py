"""The image-classification runner against transformers' own pipeline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from runtimes_helpers import make_spec

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ClassifyRequest, ClassifyResult, EmbedRequest, TensorData
from lmaas.core.types import Task
from lmaas.registry.inspection import inspect_model_dir
from lmaas.registry.sources import plan_directory
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.vision.torch import TorchImageClassificationRunner
from lmaas.testing.tiny_vision import TINY_LABELS, build_tiny_image_classifier


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_image_classifier(tmp_path_factory.mktemp("tiny-vit") / "model")


@pytest.fixture(scope="session")
def vit_runner(vit_dir: Path) -> TorchImageClassificationRunner:
    runner = TorchImageClassificationRunner(
        make_spec(vit_dir, "image-classification", options={"max_image_pixels": "250000"})
    )
    runner.load()
    runner.warmup()
    return runner


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (23, 31), dtype=np.uint8), "L"),
        Image.fromarray(rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)),
    ]


def probs_of(result: ClassifyResult) -> np.ndarray:
    matrix = np.frombuffer(result.probs, dtype="<f4")
    return matrix.reshape(result.num_inputs, result.num_labels)


def test_load_reports_labels_and_tensor_specs(vit_runner: TorchImageClassificationRunner) -> None:
    info = vit_runner.load()
    assert info.labels == list(TINY_LABELS)
    assert info.inputs is not None and info.outputs is not None
    assert [(t.name, t.datatype, t.shape) for t in info.inputs] == [
        ("image", "BYTES", [-1]),
        ("pixel_values", "FP32", [-1, 3, 32, 32]),
    ]
    assert [t.name for t in info.outputs] == ["probabilities", "label"]


def test_predictions_equal_the_transformers_pipeline(
    vit_runner: TorchImageClassificationRunner, vit_dir: Path
) -> None:
    images = sample_images()
    formats = ["PNG", "PNG", "JPEG", "BMP"]
    files = [encode(im, fmt) for im, fmt in zip(images, formats, strict=True)]
    result = vit_runner.classify(ClassifyRequest("r", images=files))
    probs = probs_of(result)
    assert probs.shape == (4, len(TINY_LABELS))
    pipe = transformers.pipeline("image-classification", model=str(vit_dir))
    decoded = [Image.open(io.BytesIO(f)) for f in files]
    for row, ranking in enumerate(pipe(decoded, top_k=None)):
        expected = {item["label"]: item["score"] for item in ranking}
        got = dict(zip(TINY_LABELS, probs[row].tolist(), strict=True))
        assert got == pytest.approx(expected, abs=1e-6)
        assert max(got, key=got.__getitem__) == ranking[0]["label"]


def test_pixel_values_give_the_same_probabilities(
    vit_runner: TorchImageClassificationRunner, vit_dir: Path
) -> None:
    images = sample_images()[:2]
    processor = transformers.AutoImageProcessor.from_pretrained(str(vit_dir))
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    tensor = pixels["pixel_values"].to(torch.float32).contiguous()
    data = TensorData("pixel_values", "FP32", list(tensor.shape), tensor.numpy().tobytes())
    from_pixels = probs_of(vit_runner.classify(ClassifyRequest("p", pixel_values=data)))
    files = [encode(im, "PNG") for im in images]
    from_files = probs_of(vit_runner.classify(ClassifyRequest("f", images=files)))
    np.testing.assert_allclose(from_pixels, from_files, atol=1e-6)


def _pixels(shape: list[int], datatype: str = "FP32", data: bytes | None = None) -> TensorData:
    size = 4 * int(np.prod(shape))
    return TensorData("pixel_values", datatype, shape, bytes(size) if data is None else data)


PNG = encode(Image.new("RGB", (8, 8), "red"), "PNG")
BAD_REQUESTS = {
    "corrupt bytes": ClassifyRequest("x", images=[b"definitely not an image"]),
    "truncated png": ClassifyRequest("x", images=[PNG[: len(PNG) // 2]]),
    "empty file": ClassifyRequest("x", images=[b""]),
    "no images": ClassifyRequest("x", images=[]),
    "bomb": ClassifyRequest("x", images=[encode(Image.new("1", (1000, 1000)), "PNG")]),
    "wrong shape": ClassifyRequest("x", pixel_values=_pixels([1, 3, 16, 16])),
    "three dims": ClassifyRequest("x", pixel_values=_pixels([3, 32, 32])),
    "wrong datatype": ClassifyRequest("x", pixel_values=_pixels([1, 3, 32, 32], "FP16")),
    "short data": ClassifyRequest("x", pixel_values=_pixels([1, 3, 32, 32], data=b"\0" * 12)),
    "nan": ClassifyRequest(
        "x", pixel_values=_pixels([1, 3, 32, 32], data=np.full(3072, np.nan, "<f4").tobytes())
    ),
    "both inputs": ClassifyRequest("x", images=[PNG], pixel_values=_pixels([1, 3, 32, 32])),
    "texts": ClassifyRequest("x", texts=["a cat"]),
    "embed request": EmbedRequest("x", texts=["a cat"]),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_inputs_are_invalid_requests(
    vit_runner: TorchImageClassificationRunner, name: str
) -> None:
    with pytest.raises(InvalidRequestError):
        vit_runner.preprocess(BAD_REQUESTS[name])
    ok = vit_runner.classify(ClassifyRequest("ok", images=[PNG]))
    assert ok.num_inputs == 1


def test_registry_and_catalog_see_an_image_classifier(vit_dir: Path) -> None:
    facts = inspect_model_dir(vit_dir)
    assert facts.task is Task.IMAGE_CLASSIFICATION and facts.labels == list(TINY_LABELS)
    plan = plan_directory(vit_dir, task=None, allow_pickle=False, trust_remote_code=False)
    names = {f.relative for f in plan.files}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    runner = create_runner(make_spec(vit_dir, "image-classification"))
    assert isinstance(runner, TorchImageClassificationRunner)
