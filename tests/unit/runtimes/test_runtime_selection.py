"""Device / dtype selection and the runner catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtimes_helpers import make_spec

from lmaas.core.errors import ModelLoadError, NotSupportedError
from lmaas.runtimes import device
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner
from lmaas.runtimes.llm.torch import TorchCausalLMRunner

CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nflags : other\n")
    assert device.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert device.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("float32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16)],
)
def test_explicit_dtypes_are_honoured(requested: str, expected: torch.dtype) -> None:
    assert device.resolve_dtype(requested, CPU) == expected
    assert device.resolve_dtype(requested, CPU, prefer_float32_on_cpu=True) == expected


def test_auto_dtype_on_cpu_follows_the_bf16_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert device.resolve_dtype("auto", CPU) == torch.bfloat16
    assert device.resolve_dtype("auto", CPU, prefer_float32_on_cpu=True) == torch.float32
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    assert device.resolve_dtype("auto", CPU) == torch.float32


def test_bad_device_and_dtype_names() -> None:
    with pytest.raises(ModelLoadError):
        device.resolve_dtype("float8", CPU)
    with pytest.raises(ModelLoadError):
        device.resolve_device("tpu-ish")
    assert device.resolve_device("auto").type in ("cpu", "cuda")
    assert device.dtype_name(torch.bfloat16) == "bfloat16"
    assert device.configure_threads(1) == 1


def test_catalog_picks_runners(tmp_path: Path) -> None:
    assert isinstance(create_runner(make_spec(tmp_path, "chat")), TorchCausalLMRunner)
    assert isinstance(create_runner(make_spec(tmp_path, "completion")), TorchCausalLMRunner)
    assert isinstance(create_runner(make_spec(tmp_path, "embedding")), TorchEmbeddingRunner)
    with pytest.raises(NotSupportedError, match="tensor"):
        create_runner(make_spec(tmp_path, "tensor"))
    with pytest.raises(NotSupportedError, match="onnx"):
        create_runner(make_spec(tmp_path, "chat", format="onnx"))


def test_missing_model_dir_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        TorchCausalLMRunner(make_spec(tmp_path / "nope")).load()
    with pytest.raises(ModelLoadError, match="does not exist"):
        TorchEmbeddingRunner(make_spec(tmp_path / "nope", "embedding")).load()


def test_catalog_picks_the_embedding_backend(tmp_path: Path) -> None:
    from lmaas.runtimes.embedding.onnx import OnnxEmbeddingRunner
    from lmaas.runtimes.tensor.onnx import OnnxTensorRunner

    def runner(fmt: str, backend: str, task: str = "embedding") -> object:
        options = {} if backend == "auto" else {"backend": backend}
        return create_runner(make_spec(tmp_path, task, format=fmt, options=options))

    assert isinstance(runner("safetensors", "auto"), TorchEmbeddingRunner)
    assert isinstance(runner("safetensors", "torch"), TorchEmbeddingRunner)
    assert isinstance(runner("safetensors", "onnxruntime"), OnnxEmbeddingRunner)
    assert isinstance(runner("onnx", "auto"), OnnxEmbeddingRunner)
    assert isinstance(runner("onnx", "onnxruntime"), OnnxEmbeddingRunner)
    assert isinstance(runner("onnx", "auto", "tensor"), OnnxTensorRunner)
    with pytest.raises(NotSupportedError, match="backend 'torch'"):
        runner("onnx", "torch")
    with pytest.raises(NotSupportedError, match="backend 'onnxruntime'"):
        runner("safetensors", "onnxruntime", "chat")


def test_catalog_serves_converted_sequence_classifiers_on_onnxruntime(tmp_path: Path) -> None:
    from lmaas.runtimes.classification.onnx import OnnxTextClassificationRunner
    from lmaas.runtimes.classification.torch import TorchTextClassificationRunner
    from lmaas.runtimes.rerank.onnx import OnnxRerankRunner
    from lmaas.runtimes.rerank.torch import TorchRerankRunner

    def runner(task: str, fmt: str) -> object:
        return create_runner(make_spec(tmp_path, task, format=fmt))

    assert isinstance(runner("classification", "onnx"), OnnxTextClassificationRunner)
    assert isinstance(runner("rerank", "onnx"), OnnxRerankRunner)
    assert type(runner("classification", "safetensors")) is TorchTextClassificationRunner
    assert type(runner("rerank", "safetensors")) is TorchRerankRunner
    with pytest.raises(ModelLoadError, match=r"has no model\.onnx"):
        OnnxTextClassificationRunner(make_spec(tmp_path, "classification", format="onnx")).load()
