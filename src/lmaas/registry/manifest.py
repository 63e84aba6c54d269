"""The manifest standard: ``lmaas.yaml``, the one description of a servable model version.

Every version in the store carries one. It is written once at import and never changed (versions
are immutable); the metadata DB keeps a copy of it as JSON for fast listing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import FileDigest
from lmaas.core.types import ModelFormat, Task, is_valid_name

MANIFEST_FILENAME = "lmaas.yaml"
"""Name of the manifest file inside every version directory."""

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_name(value: str, what: str) -> str:
    if not is_valid_name(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_relative_path(value: str) -> str:
    """Return ``value`` if it is a safe relative POSIX path inside a version directory.

    Raises:
        ValueError: The path is empty, absolute, uses backslashes, or has ``.``/``..`` parts.
    """
    if not value or "\x00" in value or "\\" in value:
        raise ValueError(f"invalid file path {value!r}")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"file path {value!r} must be relative")
    parts = value.split("/")
    if any(part in {"", ".", ".."} for part in parts):
        raise ValueError(f"file path {value!r} must not contain empty, '.' or '..' parts")
    return value


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a time zone")
    return value.astimezone(UTC)


class FileEntry(BaseModel):
    """One artifact of a model version.

    Attributes:
        path: POSIX path relative to the version directory.
        size_bytes: Size of the file.
        sha256: Hex sha256 of the file's bytes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size_bytes: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _valid_path(cls, value: str) -> str:
        return check_relative_path(value)

    @field_validator("sha256")
    @classmethod
    def _valid_sha256(cls, value: str) -> str:
        if not _SHA256_RE.fullmatch(value):
            raise ValueError(f"sha256 must be 64 lower-case hex digits, got {value!r}")
        return value


class Lineage(BaseModel):
    """Where a version came from: the version it was transformed from, or a training run.

    Attributes:
        parent: ``name:version`` of the source version; None for a model trained from scratch
            (``transform: train``), whose data and settings are in ``parameters``.
        transform: What was done (``quantize-int8``, ``onnx-export``, ``prune-30%``, ``fine-tune``).
        parameters: The transform's parameters, as given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    parent: str | None = None
    transform: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parent")
    @classmethod
    def _valid_parent(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name, sep, version = value.partition(":")
        if not sep:
            raise ValueError(f"parent must be 'name:version', got {value!r}")
        _check_name(name, "parent name")
        _check_name(version, "parent version")
        return value


class MetricRecord(BaseModel):
    """One evaluation result.

    Attributes:
        dataset_digest: Digest of the evaluation data set.
        metric: Metric name (``accuracy``, ``f1``, ``perplexity``...).
        value: The measured value.
        measured_at: When it was measured (UTC).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset_digest: str
    metric: str = Field(min_length=1)
    value: float
    measured_at: datetime

    @field_validator("measured_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _to_utc(value)


class ServingDefaults(BaseModel):
    """Serving defaults a deployment starts from; each can be overridden per deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(default=32, ge=1)
    """Most requests (or sequences) run together in one forward pass."""
    max_context: int | None = Field(default=None, ge=1)
    """Cap on prompt + output tokens; None means the model's context length."""
    kv_cache_bytes: int | None = Field(default=None, ge=0)
    """KV-cache budget of an LLM replica; None lets the runtime size it."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """``auto``, ``float32``, ``bfloat16`` or ``float16``."""
    matryoshka_dims: list[int] | None = None
    """Embedding sizes the model was trained to be truncated to (``dimensions`` parameter)."""
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    """The runtime library: ``auto`` picks by format (ONNX files → onnxruntime, else torch)."""
    options: dict[str, str] = Field(default_factory=dict)
    """Free-form runtime options, passed to the worker as ``WorkerSpec.options``.

    The import sets ``trust_remote_code: "true"`` when it was allowed to accept the model's own
    Python code (``--trust-remote-code``).
    """


class Manifest(BaseModel):
    """``lmaas.yaml``: the description of one immutable model version (see DESIGN.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    task: Task
    format: ModelFormat
    architecture: str | None = None
    dtype: str | None = None
    context_length: int | None = Field(default=None, ge=1)
    labels: list[str] | None = None
    files: list[FileEntry] = Field(default_factory=list)
    lineage: Lineage | None = None
    metrics: list[MetricRecord] = Field(default_factory=list)
    serving: ServingDefaults = Field(default_factory=ServingDefaults)
    source: str
    """Where the version was imported from (a path, a hub id, or ``name:version`` + transform)."""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "model name")

    @field_validator("version")
    @classmethod
    def _valid_version(cls, value: str) -> str:
        return _check_name(value, "model version")

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _to_utc(value)

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"

    @property
    def size_bytes(self) -> int:
        """Total size of the version's files."""
        return sum(entry.size_bytes for entry in self.files)

    def file_digests(self) -> list[FileDigest]:
        """Return the files as the worker IPC type :class:`~lmaas.core.messages.FileDigest`."""
        return [
            FileDigest(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256) for f in self.files
        ]

    def to_yaml(self) -> str:
        """Serialize to YAML (the ``lmaas.yaml`` text)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> Manifest:
        """Parse ``lmaas.yaml`` text.

        Raises:
            InvalidRequestError: The text is not YAML or not a valid manifest.
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidRequestError(f"manifest is not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Validate a plain mapping (parsed YAML or stored JSON) into a manifest.

        Raises:
            InvalidRequestError: The mapping is not a valid manifest.
        """
        if not isinstance(data, dict):
            raise InvalidRequestError("manifest must be a mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid manifest: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "manifest"
    return f"{where}: {err['msg']}"
