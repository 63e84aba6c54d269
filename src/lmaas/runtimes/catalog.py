"""Choosing a runner for a worker spec by (task, format, ``options["backend"]``).

The runners are imported inside :func:`create_runner`, so importing the catalog costs nothing
and pulls in no heavy dependency. Which library serves which (task, format), and what the
manifest's ``serving.backend`` (``auto``, ``torch``, ``onnxruntime``) may choose, is the table
of :mod:`lmaas.core.backends`; a combination outside it is a :class:`NotSupportedError` that
says which backends work. ``onnxruntime`` on a safetensors version exports the model to ONNX
once, at load time, into the worker's cache (:mod:`lmaas.runtimes.onnx_export`).
"""

from __future__ import annotations

from lmaas.core.backends import resolve_backend
from lmaas.core.errors import InternalError
from lmaas.core.messages import WorkerSpec
from lmaas.core.types import Task
from lmaas.runtimes.base import Runner

_GENERATION_TASKS = frozenset({Task.CHAT.value, Task.COMPLETION.value})


def create_runner(spec: WorkerSpec) -> Runner:
    """Build the runner that serves ``spec`` (not loaded yet: call ``load()``).

    Raises:
        NotSupportedError: no runtime serves this task in this format on this backend.
    """
    runtime = resolve_backend(spec.task, spec.format, spec.options.get("backend", "auto"))
    if runtime == "onnxruntime":
        return _onnx_runner(spec)
    if runtime == "ctranslate2":  # Whisper conversions, through faster-whisper
        from lmaas.runtimes.speech.ct2 import CT2WhisperRunner

        return CT2WhisperRunner(spec)
    return _torch_runner(spec)


def _onnx_runner(spec: WorkerSpec) -> Runner:
    task = spec.task
    if task == Task.EMBEDDING.value:
        from lmaas.runtimes.embedding.onnx import OnnxEmbeddingRunner

        return OnnxEmbeddingRunner(spec)
    if task == Task.TENSOR.value:
        from lmaas.runtimes.tensor.onnx import OnnxTensorRunner

        return OnnxTensorRunner(spec)
    if task == Task.IMAGE_CLASSIFICATION.value:
        from lmaas.runtimes.vision.onnx import OnnxImageClassificationRunner

        return OnnxImageClassificationRunner(spec)
    if task == Task.CLASSIFICATION.value:
        from lmaas.runtimes.classification.onnx import OnnxTextClassificationRunner

        return OnnxTextClassificationRunner(spec)
    if task == Task.RERANK.value:
        from lmaas.runtimes.rerank.onnx import OnnxRerankRunner

        return OnnxRerankRunner(spec)
    raise InternalError(f"lmaas.core.backends lists onnxruntime for {task} but no runner exists")


def _torch_runner(spec: WorkerSpec) -> Runner:
    task = spec.task
    if task in _GENERATION_TASKS:
        from lmaas.runtimes.llm.torch import TorchCausalLMRunner

        return TorchCausalLMRunner(spec)
    if task == Task.EMBEDDING.value:
        from lmaas.runtimes.embedding.torch import TorchEmbeddingRunner

        return TorchEmbeddingRunner(spec)
    if task == Task.RERANK.value:
        from lmaas.runtimes.rerank.torch import TorchRerankRunner

        return TorchRerankRunner(spec)
    if task == Task.CLASSIFICATION.value:
        from lmaas.runtimes.classification.torch import TorchTextClassificationRunner

        return TorchTextClassificationRunner(spec)
    if task == Task.SEQ2SEQ.value:
        from lmaas.runtimes.seq2seq.torch import TorchSeq2SeqRunner

        return TorchSeq2SeqRunner(spec)
    if task == Task.IMAGE_CLASSIFICATION.value:
        from lmaas.runtimes.vision.torch import TorchImageClassificationRunner

        return TorchImageClassificationRunner(spec)
    if task == Task.SPEECH_TO_TEXT.value:
        from lmaas.runtimes.speech.torch import TorchWhisperRunner

        return TorchWhisperRunner(spec)
    raise InternalError(f"lmaas.core.backends lists torch for {task} but no runner exists")
