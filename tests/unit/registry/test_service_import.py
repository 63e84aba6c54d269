from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lmaas.core.errors import (
    ConflictError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    OfflineError,
    UnsafeModelError,
)
from lmaas.core.hashing import sha256_file
from lmaas.core.types import ModelFormat, Task
from lmaas.registry.manifest import MANIFEST_FILENAME, Lineage, Manifest
from lmaas.registry.service import RegistryService

MakeModelDir = Callable[..., Path]


def _store_entries(home: Path) -> list[str]:
    models = home / "models"
    found = [p.relative_to(models).as_posix() for p in models.rglob("*")] if models.exists() else []
    return sorted(p for p in found if p != ".tmp")


def test_import_local_dir(
    registry: RegistryService, make_model_dir: MakeModelDir, home: Path
) -> None:
    src = make_model_dir(
        "Tiny-Llama",
        tokenizer_config={"chat_template": "{{ messages }}"},
        extra_files={"tokenizer.json": b"{}", ".git/HEAD": b"ref"},
    )
    manifest = registry.import_model(str(src), description="random weights")
    assert manifest.ref == "tiny-llama:1"
    assert manifest.task is Task.CHAT
    assert manifest.format is ModelFormat.SAFETENSORS
    assert manifest.architecture == "LlamaForCausalLM"
    assert (manifest.dtype, manifest.context_length) == ("float32", 128)
    assert manifest.source == str(src.resolve())
    assert manifest.description == "random weights"
    paths = [f.path for f in manifest.files]
    assert paths == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model_dir = registry.model_dir(manifest)
    assert model_dir == (home / "models" / "tiny-llama" / "1").resolve()
    for entry in manifest.files:
        assert sha256_file(model_dir / entry.path) == sha256_file(src / entry.path)
        assert entry.size_bytes == (src / entry.path).stat().st_size
    assert Manifest.from_yaml((model_dir / MANIFEST_FILENAME).read_text()) == manifest
    registry.verify(manifest)
    assert registry.get("tiny-llama") == manifest
    assert registry.list_models() == [manifest]
    assert not any((home / "models" / ".tmp").iterdir())


def test_versions_increment(registry: RegistryService, make_model_dir: MakeModelDir) -> None:
    src = make_model_dir("m")
    refs = [registry.import_model(str(src)).ref for _ in range(3)]
    assert refs == ["m:1", "m:2", "m:3"]
    assert registry.get("m").version == "3"
    assert registry.get("m", "2").ref == "m:2"
    assert registry.resolve("m:1").ref == "m:1"
    assert registry.resolve("m").ref == "m:3"
    other = registry.import_model(str(src), name="other")
    assert other.ref == "other:1"


def test_list_sorts_versions_numerically(registry: RegistryService, tmp_path: Path) -> None:
    onnx = tmp_path / "net.onnx"
    onnx.write_bytes(b"onnx")
    for _ in range(10):
        registry.import_model(str(onnx), name="b")
    registry.import_model(str(onnx), name="a")
    refs = [m.ref for m in registry.list_models()]
    assert refs == ["a:1"] + [f"b:{i}" for i in range(1, 11)]
    assert registry.get("b").version == "10"


def test_onnx_file(registry: RegistryService, tmp_path: Path) -> None:
    onnx = tmp_path / "My Net.onnx"
    onnx.write_bytes(b"\x08\x07not-really-onnx")
    manifest = registry.import_model(str(onnx))
    assert (manifest.name, manifest.task, manifest.format) == ("my-net", Task.TENSOR, "onnx")
    assert [f.path for f in manifest.files] == ["My Net.onnx"]
    registry.verify(manifest)
    embed = registry.import_model(str(onnx), name="net", task=Task.EMBEDDING)
    assert embed.task is Task.EMBEDDING


def test_pickle_weights_are_refused_unless_allowed(
    registry: RegistryService, make_model_dir: MakeModelDir, home: Path
) -> None:
    src = make_model_dir("pickled", weights=False, extra_files={"pytorch_model.bin": b"PK\x03\x04"})
    with pytest.raises(UnsafeModelError, match="--allow-pickle"):
        registry.import_model(str(src))
    assert registry.list_models() == []
    assert _store_entries(home) == []
    manifest = registry.import_model(str(src), allow_pickle=True)
    assert "pytorch_model.bin" in [f.path for f in manifest.files]


def test_pickle_files_beside_safetensors_are_left_out(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    src = make_model_dir(extra_files={"pytorch_model.bin": b"x", "training_args.bin": b"y"})
    manifest = registry.import_model(str(src))
    assert not [f.path for f in manifest.files if f.path.endswith(".bin")]


def test_remote_code_is_refused_unless_trusted(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    src = make_model_dir(config={"auto_map": {"AutoModel": "modeling.MyModel"}})
    with pytest.raises(UnsafeModelError, match="--trust-remote-code"):
        registry.import_model(str(src))
    manifest = registry.import_model(str(src), trust_remote_code=True)
    assert manifest.serving.options["trust_remote_code"] == "true"
    plain = registry.import_model(str(make_model_dir("plain")))
    assert "trust_remote_code" not in plain.serving.options


def test_remote_code_in_tokenizer_config(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    src = make_model_dir(tokenizer_config={"auto_map": {"AutoTokenizer": ["tok.T", None]}})
    with pytest.raises(UnsafeModelError):
        registry.import_model(str(src))


def test_hub_id_offline(registry: RegistryService) -> None:
    with pytest.raises(OfflineError, match="import the local directory"):
        registry.import_model("sentence-transformers/all-MiniLM-L6-v2")


def test_hub_unreachable(home: Path, database_url: str) -> None:
    # Port 9 (discard) on loopback refuses at once: the hub is unreachable, whatever the network.
    with RegistryService(home, database_url, hub_endpoint="http://127.0.0.1:9") as online:
        with pytest.raises(OfflineError, match="unreachable"):
            online.import_model("org/model")
        assert online.list_models() == []
    assert _store_entries(home) == []


def test_hub_unreachable_at_the_default_endpoint(
    home: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # keep the test offline
    online = RegistryService(home, database_url)
    with online, pytest.raises(OfflineError, match=r"127\.0\.0\.1:9"):
        online.import_model("org/model")


def test_neither_path_nor_hub_id(registry: RegistryService, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="neither"):
        registry.import_model(str(tmp_path / "missing" / "deeper"))


def test_unknown_task_asks_for_it(registry: RegistryService, make_model_dir: MakeModelDir) -> None:
    src = make_model_dir(architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(InvalidRequestError, match="--task"):
        registry.import_model(str(src))
    assert registry.import_model(str(src), task=Task.CHAT).task is Task.CHAT


def test_dir_without_weights_or_config(registry: RegistryService, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(InvalidRequestError, match="no model weights"):
        registry.import_model(str(empty))
    (empty / "config.json").unlink()
    (empty / "model.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidRequestError, match=r"no config\.json"):
        registry.import_model(str(empty))


def test_default_name_is_sanitized(registry: RegistryService, make_model_dir: MakeModelDir) -> None:
    assert registry.import_model(str(make_model_dir("My Model_V2 (copy)"))).name == (
        "my-model_v2-copy"
    )
    with pytest.raises(InvalidRequestError, match="--name"):
        registry.import_model(str(make_model_dir("___")))


def test_serving_options_and_lineage(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    src = make_model_dir()
    lineage = Lineage(parent="base:1", transform="quantize-int8", parameters={"bits": 8})
    with pytest.raises(ModelNotFoundError, match="base"):
        registry.import_model(str(src), lineage=lineage)  # the parent must exist
    registry.import_model(str(src), name="base")
    manifest = registry.import_model(
        str(src),
        serving={"max_batch_size": 4, "matryoshka_dims": [16], "options": {"runner": "x:y"}},
        lineage=lineage,
    )
    assert manifest.serving.max_batch_size == 4
    assert manifest.serving.options == {"runner": "x:y"}
    assert manifest.lineage is not None and manifest.lineage.parent == "base:1"
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        registry.import_model(str(src), serving={"max_batch_size": 0})
    with pytest.raises(InvalidRequestError, match="surprise"):
        registry.import_model(str(src), serving={"surprise": 1})


def test_a_backend_no_worker_could_load_is_refused(
    registry: RegistryService, make_model_dir: MakeModelDir, tmp_path: Path, home: Path
) -> None:
    """The import checks serving.backend against the task and format (lmaas.core.backends):
    a version that would only fail at load, or silently run elsewhere, is never stored."""
    src = make_model_dir()
    with pytest.raises(
        InvalidRequestError,
        match=r"completion models in safetensors format cannot run "
        r"on onnxruntime: use serving\.backend auto or torch",
    ) as caught:
        registry.import_model(str(src), serving={"backend": "onnxruntime"})
    assert caught.value.param == "backend"
    onnx = tmp_path / "net.onnx"
    onnx.write_bytes(b"\x08\x07not-really-onnx")
    with pytest.raises(InvalidRequestError, match="tensor models in onnx format cannot run on"):
        registry.import_model(str(onnx), serving={"backend": "torch"})
    assert _store_entries(home) == []
    assert registry.import_model(str(src), serving={"backend": "torch"}).serving.backend == "torch"
    assert registry.import_model(str(onnx), serving={"backend": "onnxruntime"}).task is Task.TENSOR
    with pytest.raises(InvalidRequestError, match="onnxruntime runs on the CPU") as caught:
        registry.import_model(str(onnx), serving={"device": "cuda"})
    assert caught.value.param == "device"
    custom = {"backend": "onnxruntime", "options": {"runner": "my.module:factory"}}
    assert registry.import_model(str(src), serving=custom).serving.backend == "onnxruntime"


def test_ct2_directory(registry: RegistryService, tmp_path: Path) -> None:
    src = tmp_path / "whisper-ct2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0]], "lang_ids": []}))
    (src / "model.bin").write_bytes(b"\x06\x00\x00\x00ct2")
    (src / "vocabulary.json").write_text("[]")
    manifest = registry.import_model(str(src))
    assert (manifest.format, manifest.task) == (ModelFormat.CT2, Task.SPEECH_TO_TEXT)


def test_reimporting_a_store_dir_gets_a_fresh_manifest(
    registry: RegistryService, make_model_dir: MakeModelDir
) -> None:
    first = registry.import_model(str(make_model_dir()))
    again = registry.import_model(str(registry.model_dir(first)), name=first.name)
    assert MANIFEST_FILENAME not in [f.path for f in again.files]
    registry.verify(again)


def test_file_names_that_a_manifest_cannot_hold_are_refused(
    registry: RegistryService, make_model_dir: MakeModelDir, home: Path
) -> None:
    src = make_model_dir(extra_files={"odd\\name.txt": b"x"})
    with pytest.raises(InvalidRequestError, match="odd"):
        registry.import_model(str(src))
    assert _store_entries(home) == []


def test_file_symlinks_are_copied_as_content(
    registry: RegistryService, make_model_dir: MakeModelDir, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"vocab")
    src = make_model_dir()
    os.symlink(blob, src / "vocab.txt")
    os.symlink(tmp_path, src / "loop")  # directory links are never followed
    manifest = registry.import_model(str(src))
    model_dir = registry.model_dir(manifest)
    assert (model_dir / "vocab.txt").read_bytes() == b"vocab"
    assert not (model_dir / "vocab.txt").is_symlink()
    assert not (model_dir / "loop").exists()


class _FailingProgress:
    def __init__(self) -> None:
        self.finished = False

    def start(self, total_bytes: int, description: str) -> None:
        assert total_bytes > 0

    def advance(self, num_bytes: int) -> None:
        raise KeyboardInterrupt

    def finish(self) -> None:
        self.finished = True


def test_interrupted_copy_leaves_nothing(
    registry: RegistryService, make_model_dir: MakeModelDir, home: Path
) -> None:
    progress = _FailingProgress()
    with pytest.raises(KeyboardInterrupt):
        registry.import_model(str(make_model_dir()), progress=progress)
    assert progress.finished
    assert _store_entries(home) == []
    assert registry.list_models() == []


def test_db_failure_removes_published_files(
    registry: RegistryService,
    make_model_dir: MakeModelDir,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(manifest: Manifest) -> None:
        raise InternalError("disk full")

    monkeypatch.setattr(registry._db, "add_version", fail)  # failure injection at the DB seam
    with pytest.raises(InternalError):
        registry.import_model(str(make_model_dir()))
    assert _store_entries(home) == []


def test_db_conflict_retries_with_the_next_version(
    registry: RegistryService,
    make_model_dir: MakeModelDir,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_add = registry._db.add_version
    calls: list[str] = []

    def add_once_conflicting(manifest: Manifest) -> None:
        calls.append(manifest.version)
        if len(calls) == 1:  # another gateway sharing the DB took version 1 meanwhile
            real_add(manifest.model_copy(update={"files": []}))
            raise ConflictError("taken")
        real_add(manifest)

    monkeypatch.setattr(registry._db, "add_version", add_once_conflicting)
    manifest = registry.import_model(str(make_model_dir()), name="m")
    assert calls == ["1", "2"]
    assert manifest.version == "2"
    registry.verify(manifest)
    assert not (home / "models" / "m" / "1").exists()


def test_stale_staging_dirs_are_swept(home: Path, database_url: str) -> None:
    stale = home / "models" / ".tmp" / "dead-import"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    os.utime(stale, (0, 0))
    fresh = home / "models" / ".tmp" / "running-import"
    fresh.mkdir()
    RegistryService(home, database_url).close()
    assert not stale.exists()
    assert fresh.exists()
