"""File digests shared by the registry (at import) and the workers (at load)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from lmaas.core.errors import ChecksumMismatchError

_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Return the hex sha256 of ``path``, calling ``on_bytes(n)`` after each chunk read."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


class RecordedFile(Protocol):
    """A file as a manifest records it (``FileEntry`` in the registry, ``FileDigest`` in IPC)."""

    @property
    def path(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def sha256(self) -> str: ...


def verify_file(path: Path, recorded: RecordedFile, label: str) -> None:
    """Check one file against its record: present, same size (cheap), same sha256.

    Raises:
        ChecksumMismatchError: naming ``label`` (e.g. ``name:version``), the file and both values.
    """
    if not path.is_file():
        raise ChecksumMismatchError(f"{label}: file {recorded.path!r} is missing")
    size_bytes = path.stat().st_size
    if size_bytes != recorded.size_bytes:
        raise ChecksumMismatchError(
            f"{label}: file {recorded.path!r} has {size_bytes} bytes, "
            f"the manifest records {recorded.size_bytes}"
        )
    actual = sha256_file(path)
    if actual != recorded.sha256:
        raise ChecksumMismatchError(
            f"{label}: file {recorded.path!r} does not match its manifest: sha256 {actual}, "
            f"the manifest records {recorded.sha256}"
        )
