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
        if spec.task == Task.SEQ2SEQ.value:
            from lmaas.runtimes.seq2seq.torch import TorchSeq2SeqRunner

            return TorchSeq2SeqRunner(spec)
        if spec.task == Task.IMAGE_CLASSIFICATION.value:
            from lmaas.runtimes.vision.torch import TorchImageClassificationRunner

            return TorchImageClassificationRunner(spec)
    raise NotSupportedError(
        f"no runtime serves task {spec.task!r} in format {spec.format!r} yet; supported: "
        "chat/completion, embedding, seq2seq and image-classification models in safetensors "
        "format"
    )
