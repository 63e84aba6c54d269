"""Device / dtype selection and the runner catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtimes_helpers import make_spec

from lmaas.core.backends import resolve_backend
from lmaas.core.errors import ModelLoadError, NotSupportedError
from lmaas.core.types import Task
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


_RUNNERS = {
    "torch-llm": "lmaas.runtimes.llm.torch.TorchCausalLMRunner",
    "torch-embed": "lmaas.runtimes.embedding.torch.TorchEmbeddingRunner",
    "ort-embed": "lmaas.runtimes.embedding.onnx.OnnxEmbeddingRunner",
    "torch-rerank": "lmaas.runtimes.rerank.torch.TorchRerankRunner",
    "ort-rerank": "lmaas.runtimes.rerank.onnx.OnnxRerankRunner",
    "torch-cls": "lmaas.runtimes.classification.torch.TorchTextClassificationRunner",
    "ort-cls": "lmaas.runtimes.classification.onnx.OnnxTextClassificationRunner",
    "torch-image": "lmaas.runtimes.vision.torch.TorchImageClassificationRunner",
    "ort-image": "lmaas.runtimes.vision.onnx.OnnxImageClassificationRunner",
    "torch-seq2seq": "lmaas.runtimes.seq2seq.torch.TorchSeq2SeqRunner",
    "torch-speech": "lmaas.runtimes.speech.torch.TorchWhisperRunner",
    "ct2-speech": "lmaas.runtimes.speech.ct2.CT2WhisperRunner",
    "ort-tensor": "lmaas.runtimes.tensor.onnx.OnnxTensorRunner",
}

# (task, format) → the runner of backend auto, torch, onnxruntime; None: refused.
_TABLE = {
    ("chat", "safetensors"): ("torch-llm", "torch-llm", None),
    ("completion", "safetensors"): ("torch-llm", "torch-llm", None),
    ("embedding", "safetensors"): ("torch-embed", "torch-embed", "ort-embed"),
    ("embedding", "onnx"): ("ort-embed", None, "ort-embed"),
    ("rerank", "safetensors"): ("torch-rerank", "torch-rerank", "ort-rerank"),
    ("rerank", "onnx"): ("ort-rerank", None, "ort-rerank"),
    ("classification", "safetensors"): ("torch-cls", "torch-cls", "ort-cls"),
    ("classification", "onnx"): ("ort-cls", None, "ort-cls"),
    ("image-classification", "safetensors"): ("torch-image", "torch-image", "ort-image"),
    ("image-classification", "onnx"): ("ort-image", None, "ort-image"),
    ("seq2seq", "safetensors"): ("torch-seq2seq", "torch-seq2seq", None),
    ("speech-to-text", "safetensors"): ("torch-speech", "torch-speech", None),
    ("speech-to-text", "ct2"): ("ct2-speech", None, None),
    ("tensor", "onnx"): ("ort-tensor", None, "ort-tensor"),
}


@pytest.mark.parametrize("backend", ["auto", "torch", "onnxruntime"])
@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "ct2"])
@pytest.mark.parametrize("task", [t.value for t in Task])
def test_every_task_format_and_backend(tmp_path: Path, task: str, fmt: str, backend: str) -> None:
    """The catalog serves exactly the table of docs/onnx.md; everything else is refused with a
    message naming what does work, never run on another library."""
    options = {} if backend == "auto" else {"backend": backend}
    spec = make_spec(tmp_path, task, format=fmt, options=options)
    row = _TABLE.get((task, fmt))
    expected = row[("auto", "torch", "onnxruntime").index(backend)] if row else None
    if expected is None:
        with pytest.raises(NotSupportedError) as caught:
            create_runner(spec)
        message = caught.value.message
        assert caught.value.param == "backend"
        if row is None:
            assert f"no runtime serves {task} models in {fmt} format" in message
        else:
            assert f"{task} models in {fmt} format cannot run on {backend}: use" in message
            assert f"runs on {resolve_backend(task, fmt)}" in message
        return
    runner = create_runner(spec)
    assert f"{type(runner).__module__}.{type(runner).__name__}" == _RUNNERS[expected]


def test_refusals_say_which_backend_works() -> None:
    with pytest.raises(NotSupportedError, match=r"use serving.backend auto or torch \(runs on"):
        resolve_backend("seq2seq", "safetensors", "onnxruntime")
    with pytest.raises(NotSupportedError, match="or a version of the model in ct2 on ctranslate2"):
        resolve_backend("speech-to-text", "safetensors", "onnxruntime")
    with pytest.raises(NotSupportedError, match="in safetensors on torch or onnxruntime"):
        resolve_backend("embedding", "onnx", "torch")
    with pytest.raises(NotSupportedError, match="'tf' is not one of auto, torch, onnxruntime"):
        resolve_backend("embedding", "onnx", "tf")
    with pytest.raises(NotSupportedError, match="no runtime serves bogus models in onnx format"):
        resolve_backend("bogus", "onnx")
    assert resolve_backend("speech-to-text", "ct2") == "ctranslate2"
    assert resolve_backend("speech-to-text", "ct2", device="cuda") == "ctranslate2"
    assert resolve_backend("rerank", "safetensors", "onnxruntime", "cpu") == "onnxruntime"
    with pytest.raises(NotSupportedError, match=r"set serving\.device to auto or cpu") as caught:
        resolve_backend("rerank", "onnx", "auto", "cuda:1")
    assert caught.value.param == "device"


def test_the_worker_refuses_an_llm_on_onnxruntime(tmp_path: Path) -> None:
    """The paged engine runs on torch: a chat version asking for onnxruntime fails at load."""
    from lmaas.worker.factory import create_runner as create_worker_runner

    spec = make_spec(tmp_path, "chat", options={"backend": "onnxruntime"})
    with pytest.raises(NotSupportedError, match="chat models in safetensors format cannot run"):
        create_worker_runner(spec)


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
