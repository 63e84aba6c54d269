"""Choosing a runner for a worker spec by (task, format, ``options["backend"]``).

The runners are imported inside :func:`create_runner`, so importing the catalog costs nothing
and pulls in no heavy dependency. Which library serves which (task, format), and what the
manifest's ``serving.backend`` (``auto``, ``torch``, ``onnxruntime``) may choose, is the table
of :mod:`lmaas.core.backends`; a combination outside it is a :class:`NotSupportedError` that
says which backends work. ``onnxruntime`` on a safetensors version exports the model to ONNX
once, at load time, into the worker's cache (:mod:`lmaas.runtimes.onnx_export`).
"""

from __future__ import annotations

import importlib
from typing import cast

from lmaas.core.backends import resolve_backend
from lmaas.core.errors import InternalError
from lmaas.core.messages import WorkerSpec
from lmaas.core.types import Task
from lmaas.runtimes.base import Runner

_R = "lmaas.runtimes"
RUNNERS: dict[str, dict[str, str]] = {
    "onnxruntime": {
        Task.EMBEDDING.value: f"{_R}.embedding.onnx:OnnxEmbeddingRunner",
        Task.TENSOR.value: f"{_R}.tensor.onnx:OnnxTensorRunner",
        Task.IMAGE_CLASSIFICATION.value: f"{_R}.vision.onnx:OnnxImageClassificationRunner",
        Task.CLASSIFICATION.value: f"{_R}.classification.onnx:OnnxTextClassificationRunner",
        Task.RERANK.value: f"{_R}.rerank.onnx:OnnxRerankRunner",
    },
    "torch": {
        Task.CHAT.value: f"{_R}.llm.torch:TorchCausalLMRunner",
        Task.COMPLETION.value: f"{_R}.llm.torch:TorchCausalLMRunner",
        Task.EMBEDDING.value: f"{_R}.embedding.torch:TorchEmbeddingRunner",
        Task.RERANK.value: f"{_R}.rerank.torch:TorchRerankRunner",
        Task.CLASSIFICATION.value: f"{_R}.classification.torch:TorchTextClassificationRunner",
        Task.SEQ2SEQ.value: f"{_R}.seq2seq.torch:TorchSeq2SeqRunner",
        Task.IMAGE_CLASSIFICATION.value: f"{_R}.vision.torch:TorchImageClassificationRunner",
        Task.SPEECH_TO_TEXT.value: f"{_R}.speech.torch:TorchWhisperRunner",
    },
    "ctranslate2": {  # Whisper conversions, through faster-whisper
        Task.SPEECH_TO_TEXT.value: f"{_R}.speech.ct2:CT2WhisperRunner",
    },
}
"""runtime → task → ``module:class`` of the runner (imported only when chosen)."""


def create_runner(spec: WorkerSpec) -> Runner:
    """Build the runner that serves ``spec`` (not loaded yet: call ``load()``).

    Raises:
        NotSupportedError: no runtime serves this task in this format on this backend.
    """
    runtime = resolve_backend(spec.task, spec.format, spec.options.get("backend", "auto"))
    where = RUNNERS.get(runtime, {}).get(spec.task)
    if where is None:
        raise InternalError(
            f"lmaas.core.backends lists {runtime} for {spec.task} but no runner exists"
        )
    module, _, name = where.partition(":")
    return cast(Runner, getattr(importlib.import_module(module), name)(spec))
