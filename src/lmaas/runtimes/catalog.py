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
    if spec.task == Task.IMAGE_CLASSIFICATION.value and spec.format == ModelFormat.ONNX.value:
        from lmaas.runtimes.vision.onnx import OnnxImageClassificationRunner

        return OnnxImageClassificationRunner(spec)
    if spec.task == Task.CLASSIFICATION.value and spec.format == ModelFormat.ONNX.value:
        from lmaas.runtimes.classification.onnx import OnnxTextClassificationRunner

        return OnnxTextClassificationRunner(spec)
    if spec.task == Task.RERANK.value and spec.format == ModelFormat.ONNX.value:
        from lmaas.runtimes.rerank.onnx import OnnxRerankRunner

        return OnnxRerankRunner(spec)
    if spec.format == ModelFormat.SAFETENSORS.value and backend != "onnxruntime":
        if spec.task in _GENERATION_TASKS:
            from lmaas.runtimes.llm.torch import TorchCausalLMRunner

            return TorchCausalLMRunner(spec)
        if spec.task == Task.EMBEDDING.value:
            from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner

            return TorchEmbeddingRunner(spec)
        if spec.task == Task.RERANK.value:
            from lmaas.runtimes.rerank.torch import TorchRerankRunner

            return TorchRerankRunner(spec)
        if spec.task == Task.CLASSIFICATION.value:
            from lmaas.runtimes.classification.torch import TorchTextClassificationRunner

            return TorchTextClassificationRunner(spec)
        if spec.task == Task.SEQ2SEQ.value:
            from lmaas.runtimes.seq2seq.torch import TorchSeq2SeqRunner

            return TorchSeq2SeqRunner(spec)
        if spec.task == Task.IMAGE_CLASSIFICATION.value:
            from lmaas.runtimes.vision.torch import TorchImageClassificationRunner

            return TorchImageClassificationRunner(spec)
    if spec.task == Task.SPEECH_TO_TEXT.value:
        return _speech_runner(spec)
    raise NotSupportedError(
        f"no runtime serves task {spec.task!r} in format {spec.format!r} on backend "
        f"{backend!r} yet; supported: chat/completion, embedding, rerank, classification, "
        "seq2seq and image-classification models in safetensors format on torch, embedding "
        "models on onnxruntime (safetensors or onnx), tensor, image-classification, "
        "classification and rerank models in onnx format, speech-to-text in ct2 or "
        "safetensors format"
    )


def _speech_runner(spec: WorkerSpec) -> Runner:
    """Whisper: CTranslate2 conversions through faster-whisper, HF checkpoints on torch."""
    if spec.format == ModelFormat.CT2.value:
        from lmaas.runtimes.speech.ct2 import CT2WhisperRunner

        return CT2WhisperRunner(spec)
    if spec.format == ModelFormat.SAFETENSORS.value:
        from lmaas.runtimes.speech.torch import TorchWhisperRunner

        return TorchWhisperRunner(spec)
    raise NotSupportedError(
        f"speech-to-text models in format {spec.format!r} are not supported; use ct2 or safetensors"
    )


def _embedding_on_onnx(fmt: str, backend: str) -> bool:
    if fmt == ModelFormat.ONNX.value:
        return backend != "torch"
    return fmt == ModelFormat.SAFETENSORS.value and backend == "onnxruntime"
