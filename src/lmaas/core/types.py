"""Shared value types: tasks, formats, model states, model references."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

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


LATEST_ALIAS = "latest"
"""Built-in alias: ``name@latest`` is the highest version; it cannot be set or removed."""


@dataclass(slots=True, frozen=True)
class ModelRef:
    """What a client names: ``name``, ``name:version`` or ``name@alias`` (at most one of them).

    Attributes:
        name: The model name.
        version: The version after ``:``, or None.
        alias: The alias after ``@``, or None.
    """

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_model_ref(ref: str) -> ModelRef | None:
    """Split ``name``, ``name:version`` or ``name@alias``; None when the text cannot be a ref.

    Every part must match :data:`NAME_PATTERN`, so a malformed reference reads as an unknown
    model (404), never as a different one.
    """
    name, at, alias = ref.partition("@")
    name, colon, version = name.partition(":")
    if (at and colon) or not is_valid_name(name):
        return None
    if colon:
        return ModelRef(name, version=version) if is_valid_name(version) else None
    if at:
        return ModelRef(name, alias=alias) if is_valid_name(alias) else None
    return ModelRef(name)
