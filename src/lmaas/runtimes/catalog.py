"""Choosing a runner for a worker spec by (task, format).

The torch runners are imported inside :func:`create_runner`, so importing the catalog costs
nothing and pulls in no heavy dependency.
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
    if spec.format == ModelFormat.SAFETENSORS.value:
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
        f"no runtime serves task {spec.task!r} in format {spec.format!r} yet; supported: "
        "chat/completion, embedding, rerank, classification, seq2seq and image-classification "
        "models in safetensors format, speech-to-text in ct2 or safetensors format"
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
