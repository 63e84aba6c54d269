"""Import sources: a local HF-format directory, a single ``.onnx`` file, or a hub id.

:func:`plan_import` looks at a local source and decides, before anything is copied, which files
go into the store, in which format, for which task, and whether the import is safe (no pickle
weights, no custom code, unless the caller said so).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import httpx

from lmaas.core.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OfflineError,
    UnsafeModelError,
)
from lmaas.core.types import ModelFormat, Task, is_valid_name
from lmaas.registry.inspection import ModelFacts, inspect_model_dir, read_json
from lmaas.registry.manifest import MANIFEST_FILENAME, check_relative_path

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
"""Files that may hold pickled Python objects (loading them can run arbitrary code)."""

EXCLUDED_DIRS = frozenset({".git", ".cache", "__pycache__", ".ipynb_checkpoints"})
"""Directories of a source that are never copied (VCS data, download caches)."""

HUB_PROBE_TIMEOUT_S = 5.0
"""How long the reachability check of the model hub may take before the import is offline."""

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_CT2_VOCABULARIES = (
    "vocabulary.json",
    "vocabulary.txt",
    "shared_vocabulary.json",
    "shared_vocabulary.txt",
)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file to import: where it is now and where it goes (relative POSIX path)."""

    path: Path
    relative: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class ImportPlan:
    """Everything decided about a local source before any byte is copied."""

    files: tuple[SourceFile, ...]
    format: ModelFormat
    facts: ModelFacts
    default_name: str
    trust_remote_code: bool = False

    @property
    def total_bytes(self) -> int:
        """Bytes to copy."""
        return sum(f.size_bytes for f in self.files)


def sanitize_name(raw: str) -> str:
    """Turn a directory or file name into a model name, or raise with a suggestion.

    Raises:
        InvalidRequestError: Nothing usable is left after sanitizing.
    """
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower())
    name = re.sub(r"^[^a-z0-9]+", "", name)[:64].rstrip("-.")
    if not is_valid_name(name):
        raise InvalidRequestError(
            f"cannot derive a model name from {raw!r}; pass one with --name (e.g. --name my-model)",
            param="name",
        )
    return name


def is_hub_id(source: str) -> bool:
    """True when ``source`` looks like a Hugging Face hub id (``org/model``)."""
    return bool(_HUB_ID_RE.fullmatch(source)) and ".." not in source


def _offline_message(repo_id: str, reason: str) -> str:
    return (
        f"cannot download {repo_id!r} from the Hugging Face hub: {reason}. Download it on a "
        f"machine with network access (e.g. `huggingface-cli download {repo_id} --local-dir DIR`)"
        " and import the local directory instead: `lmaas models import DIR`"
    )


def download_from_hub(
    repo_id: str, dest: Path, *, offline: bool, allow_pickle: bool, endpoint: str | None = None
) -> Path:
    """Download a hub snapshot into ``dest`` (used only when online and huggingface_hub exists).

    Raises:
        OfflineError: Offline, huggingface_hub missing, or the hub unreachable.
        ModelNotFoundError: The hub has no such repository (or it is private or gated).
    """
    if offline:
        raise OfflineError(_offline_message(repo_id, "lmaas is running offline"))
    if importlib.util.find_spec("huggingface_hub") is None:
        raise OfflineError(
            _offline_message(repo_id, "the huggingface_hub package is not installed")
        )
    # Optional dependency: imported only for hub sources.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    base = endpoint or constants.ENDPOINT
    try:
        httpx.head(base, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise OfflineError(_offline_message(repo_id, f"{base} is unreachable ({exc})")) from exc
    ignore = None if allow_pickle else [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    try:
        snapshot_download(
            repo_id,
            local_dir=dest,
            ignore_patterns=ignore,
            etag_timeout=HUB_PROBE_TIMEOUT_S,
            endpoint=endpoint,
        )
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            f"{repo_id!r} is not on the hub, or is private or gated", param="source"
        ) from exc
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        raise OfflineError(_offline_message(repo_id, str(exc))) from exc
    return dest


def _walk(root: Path) -> list[SourceFile]:
    found: list[SourceFile] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in relative.parts):
            continue
        if relative.as_posix() == MANIFEST_FILENAME:
            continue  # a re-imported version gets a fresh manifest
        if path.is_symlink() and path.is_dir():
            continue  # never follow directory links out of the source (or into a loop)
        if path.is_file():
            try:
                check_relative_path(relative.as_posix())
            except ValueError as exc:
                raise InvalidRequestError(f"cannot import {root.name}: {exc}") from exc
            found.append(SourceFile(path, relative.as_posix(), path.stat().st_size))
    return found


def _looks_pickled(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _is_ct2(root: Path) -> bool:
    model_bin = root / "model.bin"
    has_vocab = any((root / name).is_file() for name in _CT2_VOCABULARIES)
    return has_vocab and model_bin.is_file() and not _looks_pickled(model_bin)


def _format_of(files: list[SourceFile], root: Path) -> ModelFormat:
    suffixes = {Path(f.relative).suffix for f in files}
    if ".safetensors" in suffixes:
        return ModelFormat.SAFETENSORS
    if _is_ct2(root):
        return ModelFormat.CT2
    if ".onnx" in suffixes:
        return ModelFormat.ONNX
    return ModelFormat.SAFETENSORS


def _drop_pickles(
    files: list[SourceFile], fmt: ModelFormat, root: Path, allow_pickle: bool
) -> list[SourceFile]:
    def is_pickle(f: SourceFile) -> bool:
        return Path(f.relative).suffix in PICKLE_SUFFIXES and not (
            fmt is ModelFormat.CT2 and f.relative == "model.bin"
        )

    pickles = [f for f in files if is_pickle(f)]
    if not pickles or allow_pickle:
        return files
    has_safe_weights = any(Path(f.relative).suffix in {".safetensors", ".onnx"} for f in files)
    if has_safe_weights or fmt is ModelFormat.CT2:
        logger.warning("not importing pickle files of %s: %s", root, [f.relative for f in pickles])
        return [f for f in files if not is_pickle(f)]
    names = ", ".join(f.relative for f in pickles[:3])
    raise UnsafeModelError(
        f"{root.name} ships pickle weights ({names}); loading them can run arbitrary code. "
        "Convert them to safetensors, or pass --allow-pickle if you trust the source",
        param="allow_pickle",
    )


def _check_remote_code(root: Path, trust_remote_code: bool) -> None:
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        if "auto_map" in read_json(root / name):
            raise UnsafeModelError(
                f"{root.name}/{name} has an 'auto_map': the model needs its own Python code, "
                "which lmaas runs only with --trust-remote-code",
                param="trust_remote_code",
            )


def _check_weights(files: list[SourceFile], fmt: ModelFormat, root: Path) -> None:
    weight_suffixes = {".safetensors", ".onnx"} | PICKLE_SUFFIXES
    if fmt is ModelFormat.CT2 or any(Path(f.relative).suffix in weight_suffixes for f in files):
        return
    raise InvalidRequestError(
        f"no model weights found in {root} (expected *.safetensors, *.onnx or a CTranslate2 "
        "model.bin)"
    )


def plan_directory(
    root: Path, *, task: Task | None, allow_pickle: bool, trust_remote_code: bool
) -> ImportPlan:
    """Plan the import of a local model directory.

    Raises:
        UnsafeModelError: Pickle weights or custom code without the matching flag.
        InvalidRequestError: No config or weights, or the task cannot be inferred.
    """
    files = _walk(root)
    fmt = _format_of(files, root)
    _check_remote_code(root, trust_remote_code)
    files = _drop_pickles(files, fmt, root, allow_pickle)
    _check_weights(files, fmt, root)
    has_config = (root / "config.json").is_file() or (root / "modules.json").is_file()
    if not has_config and task is None:
        if fmt is not ModelFormat.ONNX:
            raise InvalidRequestError(f"{root} has no config.json; is it a model directory?")
        task = Task.TENSOR
    facts = inspect_model_dir(root, task)
    return ImportPlan(tuple(files), fmt, facts, sanitize_name(root.name), trust_remote_code)


def plan_onnx_file(path: Path, *, task: Task | None) -> ImportPlan:
    """Plan the import of a single ``.onnx`` file (its content is not parsed here)."""
    entry = SourceFile(path, path.name, path.stat().st_size)
    facts = ModelFacts(task=task or Task.TENSOR)
    return ImportPlan((entry,), ModelFormat.ONNX, facts, sanitize_name(path.stem))


def plan_import(
    path: Path, *, task: Task | None, allow_pickle: bool, trust_remote_code: bool
) -> ImportPlan:
    """Plan the import of a local path (a model directory or an ``.onnx`` file).

    Raises:
        InvalidRequestError: The path is neither.
    """
    if path.is_dir():
        return plan_directory(
            path, task=task, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
    if path.is_file() and path.suffix.lower() == ".onnx":
        return plan_onnx_file(path, task=task)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeModelError(f"{path.name} is a pickle file; import its directory instead")
    raise InvalidRequestError(
        f"cannot import {str(path)!r}: expected a model directory or an .onnx file"
    )
