from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import FileDigest
from lmaas.core.types import ModelFormat, Task
from lmaas.registry.manifest import FileEntry, Lineage, Manifest, MetricRecord, ServingDefaults

SHA = "a" * 64


def _manifest(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "tiny-llama",
        "version": "3",
        "task": Task.CHAT,
        "format": ModelFormat.SAFETENSORS,
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "context_length": 2048,
        "files": [FileEntry(path="model.safetensors", size_bytes=10, sha256=SHA)],
        "source": "/models/tiny-llama",
    }
    fields.update(overrides)
    return Manifest(**fields)


def test_yaml_round_trip_keeps_every_field() -> None:
    manifest = _manifest(
        labels=["neg", "pos"],
        lineage=Lineage(parent="tiny-llama:2", transform="quantize-int8", parameters={"bits": 8}),
        metrics=[
            MetricRecord(
                dataset_digest="sha256:" + SHA,
                metric="accuracy",
                value=0.5,
                measured_at=datetime(2025, 1, 2, tzinfo=UTC),
            )
        ],
        serving=ServingDefaults(max_batch_size=8, matryoshka_dims=[64, 128]),
        description="random weights, for trying the pipeline",
    )
    again = Manifest.from_yaml(manifest.to_yaml())
    assert again == manifest
    assert again.ref == "tiny-llama:3"
    assert again.size_bytes == 10


def test_file_digests_are_the_ipc_type() -> None:
    digests = _manifest().file_digests()
    assert digests == [FileDigest(path="model.safetensors", size_bytes=10, sha256=SHA)]


def test_defaults() -> None:
    manifest = _manifest()
    assert manifest.serving == ServingDefaults()
    assert manifest.serving.max_batch_size == 32
    assert manifest.serving.device == "auto"
    assert manifest.metrics == []
    assert manifest.created_at.tzinfo == UTC


@pytest.mark.parametrize(
    "bad", ["", "Upper", "../etc", "a/b", "..", ".", "-lead", "a" * 65, "a\\b", "\uff41", "a b"]
)
def test_invalid_names_and_versions_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        _manifest(name=bad)
    with pytest.raises(ValidationError):
        _manifest(version=bad)


@pytest.mark.parametrize(
    "path", ["", "../x", "a/../b", "/etc/passwd", "a\\b", "./a", "a//b", "C:x", "a/.", "a\x00"]
)
def test_unsafe_file_paths_are_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        FileEntry(path=path, size_bytes=1, sha256=SHA)


def test_nested_relative_paths_are_fine() -> None:
    assert FileEntry(path="1_Pooling/config.json", size_bytes=1, sha256=SHA).path


def test_sha256_must_be_hex() -> None:
    with pytest.raises(ValidationError):
        FileEntry(path="a", size_bytes=1, sha256="xyz")


@pytest.mark.parametrize("parent", ["tiny", "tiny:", ":1", "../x:1", "a:../b"])
def test_lineage_parent_must_be_a_ref(parent: str) -> None:
    with pytest.raises(ValidationError):
        Lineage(parent=parent, transform="fine-tune")


def test_timestamps_must_be_aware_and_become_utc() -> None:
    with pytest.raises(ValidationError):
        _manifest(created_at=datetime(2025, 1, 1))
    local = datetime(2025, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert _manifest(created_at=local).created_at == datetime(2025, 1, 1, 10, tzinfo=UTC)


def test_unknown_fields_and_bad_yaml_raise_invalid_request() -> None:
    data = _manifest().model_dump(mode="json")
    data["surprise"] = 1
    with pytest.raises(InvalidRequestError, match="surprise"):
        Manifest.from_dict(data)
    with pytest.raises(InvalidRequestError):
        Manifest.from_yaml("name: [unclosed")
    with pytest.raises(InvalidRequestError, match="mapping"):
        Manifest.from_yaml("- a list")
    with pytest.raises(InvalidRequestError, match="task"):
        Manifest.from_dict({**_manifest().model_dump(mode="json"), "task": "dance"})


def test_yaml_is_safe() -> None:
    with pytest.raises(InvalidRequestError):
        Manifest.from_yaml("!!python/object/apply:os.system ['true']")
