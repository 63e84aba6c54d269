"""Shared value types: tasks, formats, model states."""

from __future__ import annotations

import enum
import re

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
"""Model names and versions: lower-case, no path separators, at most 64 characters."""

_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(value: str) -> bool:
    """True when ``value`` matches :data:`NAME_PATTERN` and cannot name a path outside the store."""
    return bool(_NAME_RE.fullmatch(value)) and value not in {".", ".."}


class Task(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANK = "rerank"
    CLASSIFICATION = "classification"
    SEQ2SEQ = "seq2seq"
    SPEECH_TO_TEXT = "speech-to-text"
    IMAGE_CLASSIFICATION = "image-classification"
    TENSOR = "tensor"

    @property
    def generates_text(self) -> bool:
        return self in (Task.CHAT, Task.COMPLETION)


class ModelFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    CT2 = "ct2"


class ModelState(enum.StrEnum):
    """Lifecycle of a served model replica, as readiness reports it."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"
    STOPPED = "stopped"
