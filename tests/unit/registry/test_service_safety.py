"""Traversal refusal, checksum verification and removal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lmaas.core.errors import (
    ChecksumMismatchError,
    InvalidRequestError,
    ModelNotFoundError,
)
from lmaas.core.hashing import sha256_file
from lmaas.registry.manifest import FileEntry
from lmaas.registry.service import RegistryService

MakeModelDir = Callable[..., Path]

TRAVERSAL_NAMES = [
    "../etc",
    "a/../b",
    "/etc/passwd",
    "..",
    ".",
    "a\\..\\b",
    "\uff0e\uff0e",  # full-width dots
    "\uff0e\uff0e/etc",
    "..%2f",
    "..%2fetc",
    "%2e%2e",
    "models/../../canary",
    "",
    "~root",
    "a\x00b",
]


def _snapshot(root: Path, home: Path) -> dict[str, bytes]:
    """Every file under ``root`` outside ``home``, with its content."""
    return {
        str(p): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_relative_to(home)
    }


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "passwd"
    path.parent.mkdir()
    path.write_text("root:x:0:0\n")
    (tmp_path / "canary").mkdir()
    (tmp_path / "canary" / "1").write_text("keep me")
    return path


@pytest.mark.parametrize("bad", TRAVERSAL_NAMES)
def test_traversal_names_are_refused(
    registry: RegistryService,
    make_model_dir: MakeModelDir,
    tmp_path: Path,
    home: Path,
    canary: Path,
    bad: str,
) -> None:
    src = make_model_dir()
    kept = registry.import_model(str(src), name="kept")
    before = _snapshot(tmp_path, home)
    with pytest.raises(InvalidRequestError):
        registry.import_model(str(src), name=bad)
    for call in (
        lambda: registry.get(bad),
        lambda: registry.get("kept", bad),
        lambda: registry.resolve(bad),
        lambda: registry.resolve(f"kept:{bad}"),
        lambda: registry.remove(bad),
        lambda: registry.remove("kept", bad),
    ):
        with pytest.raises(ModelNotFoundError):
            call()
    assert _snapshot(tmp_path, home) == before
    assert canary.read_text() == "root:x:0:0\n"
    assert [m.ref for m in registry.list_models()] == ["kept:1"]
    registry.verify(kept)


def test_manifest_paths_cannot_escape(
    registry: RegistryService, make_model_dir: MakeModelDir, canary: Path
) -> None:
    manifest = registry.import_model(str(make_model_dir()))
    # A manifest can only be built from validated entries; bypass validation as an attacker would.
    evil = FileEntry.model_construct(path="../../../etc/passwd", size_bytes=11, sha256="0" * 64)
    tampered = manifest.model_copy(update={"files": [evil]})
    with pytest.raises(InvalidRequestError):
        registry.verify(tampered)


def test_checksum_mismatch_after_tampering(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    manifest = registry.import_model(str(make_model_dir()))
    weights = registry.model_dir(manifest) / "model.safetensors"
    expected = next(f.sha256 for f in manifest.files if f.path == "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as info:
        registry.verify(manifest)
    message = info.value.message
    assert "model.safetensors" in message
    assert expected in message and sha256_file(weights) in message


def test_size_change_and_missing_file(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    manifest = registry.import_model(str(make_model_dir()))
    model_dir = registry.model_dir(manifest)
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ChecksumMismatchError, match=r"config\.json.*bytes"):
        registry.verify(manifest)
    (model_dir / "config.json").unlink()
    with pytest.raises(ChecksumMismatchError, match=r"config\.json.*missing"):
        registry.verify(manifest)


def test_remove_one_version_then_all(
    registry: RegistryService, make_model_dir: MakeModelDir, home: Path
) -> None:
    src = make_model_dir()
    for _ in range(3):
        registry.import_model(str(src), name="m")
    keep = registry.import_model(str(src), name="keep")
    removed = registry.remove("m", "2")
    assert [m.ref for m in removed] == ["m:2"]
    assert not (home / "models" / "m" / "2").exists()
    assert [m.ref for m in registry.list_models()] == ["keep:1", "m:1", "m:3"]
    with pytest.raises(ModelNotFoundError, match="m:2"):
        registry.get("m", "2")
    assert registry.import_model(str(src), name="m").version == "4"
    removed = registry.remove("m")
    assert [m.ref for m in removed] == ["m:1", "m:3", "m:4"]
    assert not (home / "models" / "m").exists()
    assert registry.list_models() == [keep]
    with pytest.raises(ModelNotFoundError):
        registry.remove("m")
    assert registry.import_model(str(src), name="m").version == "1"
    assert not any((home / "models" / ".tmp").iterdir())


def test_unknown_models(registry: RegistryService) -> None:
    with pytest.raises(ModelNotFoundError, match="lmaas models list"):
        registry.get("nope")
    with pytest.raises(ModelNotFoundError):
        registry.resolve("nope:1")
    with pytest.raises(ModelNotFoundError):
        registry.resolve("nope:")
