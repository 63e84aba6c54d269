"""Which runtime library serves which (task, format): the one table behind ``serving.backend``.

The manifest's ``serving.backend`` names the library a version runs on: ``auto`` (the first
library of its row below), ``torch`` or ``onnxruntime``. The import checks it (a version that
no worker could load is refused before it is stored) and the worker checks it again at load
(versions stored before the check existed), both through :func:`resolve_backend`, so a
combination that does not work is one clear error that says which backends do, never a
silent fallback to another library.

``ctranslate2`` (speech-to-text versions in ``ct2`` format, through faster-whisper) cannot be
named: such versions run with ``backend: auto``.
"""

from __future__ import annotations

from lmaas.core.errors import NotSupportedError
from lmaas.core.types import ModelFormat, Task

BACKEND_CHOICES = ("auto", "torch", "onnxruntime")
"""What ``serving.backend`` may say."""

_SAFETENSORS, _ONNX, _CT2 = ModelFormat.SAFETENSORS, ModelFormat.ONNX, ModelFormat.CT2

RUNTIMES: dict[tuple[Task, ModelFormat], tuple[str, ...]] = {
    (Task.CHAT, _SAFETENSORS): ("torch",),
    (Task.COMPLETION, _SAFETENSORS): ("torch",),
    (Task.EMBEDDING, _SAFETENSORS): ("torch", "onnxruntime"),
    (Task.EMBEDDING, _ONNX): ("onnxruntime",),
    (Task.RERANK, _SAFETENSORS): ("torch", "onnxruntime"),
    (Task.RERANK, _ONNX): ("onnxruntime",),
    (Task.CLASSIFICATION, _SAFETENSORS): ("torch", "onnxruntime"),
    (Task.CLASSIFICATION, _ONNX): ("onnxruntime",),
    (Task.IMAGE_CLASSIFICATION, _SAFETENSORS): ("torch", "onnxruntime"),
    (Task.IMAGE_CLASSIFICATION, _ONNX): ("onnxruntime",),
    (Task.SEQ2SEQ, _SAFETENSORS): ("torch",),
    (Task.SPEECH_TO_TEXT, _SAFETENSORS): ("torch",),
    (Task.SPEECH_TO_TEXT, _CT2): ("ctranslate2",),
    (Task.TENSOR, _ONNX): ("onnxruntime",),
}
"""(task, format) → the libraries that serve it; ``auto`` picks the first. ``onnxruntime`` on
a safetensors version exports the model to ONNX once, at load time, into the worker's cache."""


def resolve_backend(task: str, fmt: str, backend: str = "auto", device: str = "auto") -> str:
    """The library that serves a version of ``task`` in ``fmt`` with ``serving.backend``.

    Args:
        task: The version's task (a :class:`Task` value).
        fmt: Its format (a :class:`ModelFormat` value).
        backend: ``serving.backend``: ``auto``, ``torch`` or ``onnxruntime``.
        device: ``serving.device`` as the manifest states it (``auto``, ``cpu``, ``cuda``...):
            onnxruntime runs on the CPU only, so an explicit GPU is refused for it. (Workers
            pass nothing: their device is the server's default when the manifest says auto.)

    Returns:
        ``torch``, ``onnxruntime`` or ``ctranslate2``.

    Raises:
        NotSupportedError: no library serves this combination; the message says what does.
    """
    if backend not in BACKEND_CHOICES:
        raise NotSupportedError(
            f"serving.backend {backend!r} is not one of {', '.join(BACKEND_CHOICES)}",
            param="backend",
        )
    runtimes = _runtimes(task, fmt)
    if runtimes is None:
        raise NotSupportedError(
            f"no runtime serves {task} models in {fmt} format; {task} models run in "
            f"{_formats_of(task)}",
            param="backend",
        )
    runtime = runtimes[0] if backend == "auto" else backend
    if runtime not in runtimes:
        raise NotSupportedError(
            f"{task} models in {fmt} format cannot run on {backend}: {_hint(task, fmt, runtimes)}",
            param="backend",
        )
    if runtime == "onnxruntime" and device.startswith("cuda"):
        raise NotSupportedError(
            f"onnxruntime runs on the CPU in lmaas, not on {device}: set serving.device to "
            "auto or cpu, or serve the model with serving.backend torch to use a GPU",
            param="device",
        )
    return runtime


def _runtimes(task: str, fmt: str) -> tuple[str, ...] | None:
    try:
        return RUNTIMES.get((Task(task), ModelFormat(fmt)))
    except ValueError:
        return None  # an unknown task or format has no row


def _hint(task: str, fmt: str, runtimes: tuple[str, ...]) -> str:
    namable = [r for r in runtimes if r in BACKEND_CHOICES]
    advice = f"use serving.backend {' or '.join(['auto', *namable])} (runs on {runtimes[0]})"
    others = [
        f"{other.value} on {' or '.join(libs)}"
        for (t, other), libs in RUNTIMES.items()
        if t == task and other != fmt
    ]
    if others:
        advice += f", or a version of the model in {'; '.join(others)}"
    return advice


def _formats_of(task: str) -> str:
    rows = [
        f"{fmt.value} on {' or '.join(libs)}" for (t, fmt), libs in RUNTIMES.items() if t == task
    ]
    return "; ".join(rows) if rows else "no format yet"
