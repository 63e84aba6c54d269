"""On-disk model store: ``<home>/models/<name>/<version>/`` with ``lmaas.yaml`` beside the files.

Every version is staged in ``<home>/models/.tmp/<random>/`` (files copied and hashed in one pass,
then fsynced) and published with one ``rename``, so a reader never sees a half-written version
and a failed import leaves nothing behind. Every path is checked to stay inside the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmaas.core.errors import ConflictError, InvalidRequestError, ModelNotFoundError
from lmaas.core.types import is_valid_name
from lmaas.registry.manifest import MANIFEST_FILENAME, FileEntry, Manifest, check_relative_path

STALE_STAGING_AGE_S = 24 * 3600.0
"""Staging directories older than this belong to imports that died; they are swept on open."""

_CHUNK_BYTES = 1 << 20
_TMP_DIRNAME = ".tmp"
_TRASH_PREFIX = "trash-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_and_hash(src: Path, dst: Path, on_bytes: Callable[[int], None] | None = None) -> FileEntry:
    """Copy ``src`` to ``dst`` (which must not exist), hashing the bytes as they pass.

    Returns:
        A :class:`FileEntry` whose ``path`` is ``dst``'s name; callers set the relative path.
    """
    digest = hashlib.sha256()
    size_bytes = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as reader, dst.open("xb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            size_bytes += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    return FileEntry(path=dst.name, size_bytes=size_bytes, sha256=digest.hexdigest())


class ModelStore:
    """The version directories under ``<home>/models``.

    Args:
        root: The ``models`` directory; created on first write.
    """

    def __init__(self, root: Path) -> None:
        self._root = root.expanduser().resolve()

    @property
    def root(self) -> Path:
        """The resolved ``models`` directory."""
        return self._root

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved == self._root or not resolved.is_relative_to(self._root):
            raise InvalidRequestError(f"path {str(path)!r} escapes the model store")
        return resolved

    def version_dir(self, name: str, version: str) -> Path:
        """Return the directory of ``name:version`` (which may not exist).

        Raises:
            ModelNotFoundError: The name or version is not a valid name, so no such model exists.
        """
        if not (is_valid_name(name) and is_valid_name(version)):
            raise ModelNotFoundError(f"model {name!r} version {version!r} does not exist")
        return self._inside(self._root / name / version)

    def file_path(self, manifest: Manifest, relative: str) -> Path:
        """Return the absolute path of one of ``manifest``'s files, proven inside its directory.

        Raises:
            InvalidRequestError: ``relative`` is not a safe relative path.
        """
        try:
            check_relative_path(relative)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        base = self.version_dir(manifest.name, manifest.version)
        path = (base / relative).resolve()
        if not path.is_relative_to(base):
            raise InvalidRequestError(f"file {relative!r} escapes {manifest.ref}")
        return path

    def read_manifest(self, name: str, version: str) -> Manifest:
        """Read ``lmaas.yaml`` of a published version.

        Raises:
            ModelNotFoundError: The version directory or its manifest is missing.
        """
        path = self.version_dir(name, version) / MANIFEST_FILENAME
        if not path.is_file():
            raise ModelNotFoundError(f"model {name}:{version} has no manifest on disk")
        return Manifest.from_yaml(path.read_text(encoding="utf-8"))

    def disk_versions(self, name: str) -> list[str]:
        """Return the version directory names present on disk for ``name``."""
        if not is_valid_name(name):
            return []
        base = self._inside(self._root / name)
        if not base.is_dir():
            return []
        return [p.name for p in base.iterdir() if p.is_dir() and is_valid_name(p.name)]

    def sweep_staging(self, max_age_s: float = STALE_STAGING_AGE_S) -> None:
        """Remove staging directories left by imports that died more than ``max_age_s`` ago."""
        tmp_root = self._root / _TMP_DIRNAME
        if not tmp_root.is_dir():
            return
        cutoff = time.time() - max_age_s
        for entry in tmp_root.iterdir():
            try:
                if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue  # removed by a concurrent sweep

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield a fresh staging directory, removed on exit unless it was published."""
        tmp_root = self._root / _TMP_DIRNAME
        tmp_root.mkdir(parents=True, exist_ok=True)
        stage = self._inside(tmp_root / uuid.uuid4().hex)
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def publish(self, stage: Path, manifest: Manifest) -> Path:
        """Write the manifest into ``stage`` and rename it to the version directory.

        Raises:
            ConflictError: The version directory exists already.
        """
        stage = self._inside(stage)
        (stage / MANIFEST_FILENAME).write_text(manifest.to_yaml(), encoding="utf-8")
        _fsync_dir(stage)
        final = self.version_dir(manifest.name, manifest.version)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            # mkdir + rename over an empty directory would replace it: refuse anything present.
            if final.exists():
                raise FileExistsError(final)
            stage.rename(final)
        except OSError as exc:
            raise ConflictError(f"model version {manifest.ref} already exists on disk") from exc
        _fsync_dir(final.parent)
        return final

    def unpublish(self, manifest: Manifest, stage: Path) -> None:
        """Move a just-published version back to its staging directory (to retry elsewhere)."""
        final = self.version_dir(manifest.name, manifest.version)
        final.rename(self._inside(stage))
        parent = final.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()

    def delete(self, name: str, version: str) -> None:
        """Remove a version directory: renamed into staging first, so removal looks atomic."""
        final = self.version_dir(name, version)
        if not final.exists():
            return
        tmp_root = self._root / _TMP_DIRNAME
        tmp_root.mkdir(parents=True, exist_ok=True)
        trash = self._inside(tmp_root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}")
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        parent = final.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
