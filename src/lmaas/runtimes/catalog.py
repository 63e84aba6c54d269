"""Choosing a runner for a worker spec by (task, format, ``options["backend"]``).

The runners are imported inside :func:`create_runner`, so importing the catalog costs nothing
and pulls in no heavy dependency. The backend (the manifest's ``serving.backend``) is ``auto``
(by format: ONNX graphs run on onnxruntime, safetensors on torch), ``torch`` or ``onnxruntime``
(a safetensors encoder is then exported to ONNX at load time).
"""

from __future__ import annotations

from lmaas.core.errors import NotSupportedError
from lmaas.core.messages import WorkerSpec
from lmaas.core.types import ModelFormat, Task
from lmaas.runtimes.base import Runner

_GENERATION_TASKS = frozenset({Task.CHAT.value, Task.COMPLETION.value})


def create_runner(spec: WorkerSpec) -> Runner:
    """Build the runner that serves ``spec`` (not loaded yet: call ``load()``).

    Raises:
        NotSupportedError: no runtime serves this task in this format.
    """
    backend = spec.options.get("backend", "auto")
    if spec.task == Task.EMBEDDING.value and _embedding_on_onnx(spec.format, backend):
        from lmaas.runtimes.embedding.onnx import OnnxEmbeddingRunner

        return OnnxEmbeddingRunner(spec)
    if spec.task == Task.TENSOR.value and spec.format == ModelFormat.ONNX.value:
        from lmaas.runtimes.tensor.onnx import OnnxTensorRunner

        return OnnxTensorRunner(spec)
    if spec.format == ModelFormat.SAFETENSORS.value and backend != "onnxruntime":
        if spec.task in _GENERATION_TASKS:
            from lmaas.runtimes.llm.torch import TorchCausalLMRunner

            return TorchCausalLMRunner(spec)
        if spec.task == Task.EMBEDDING.value:
            from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner

            return TorchEmbeddingRunner(spec)
    raise NotSupportedError(
        f"no runtime serves task {spec.task!r} in format {spec.format!r} on backend "
        f"{backend!r} yet; supported: "
        "chat/completion and embedding models in safetensors format, embedding models on "
        "onnxruntime (safetensors or onnx) and tensor models in onnx format"
    )


def _embedding_on_onnx(fmt: str, backend: str) -> bool:
    if fmt == ModelFormat.ONNX.value:
        return backend != "torch"
    return fmt == ModelFormat.SAFETENSORS.value and backend == "onnxruntime"
