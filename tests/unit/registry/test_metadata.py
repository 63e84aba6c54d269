from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from lmaas.core.errors import ConflictError
from lmaas.core.types import ModelFormat, Task
from lmaas.registry.manifest import FileEntry, Manifest
from lmaas.registry.metadata import (
    MetadataStore,
    create_db_engine,
    head_revision,
    normalize_database_url,
    upgrade_schema,
)


def _manifest(name: str, version: str) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        task=Task.EMBEDDING,
        format=ModelFormat.ONNX,
        files=[FileEntry(path="model.onnx", size_bytes=7, sha256="b" * 64)],
        source="/tmp/model.onnx",
    )


def test_migrations_create_the_schema_and_are_idempotent(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        upgrade_schema(engine)
        upgrade_schema(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"models", "model_versions", "alembic_version"} <= tables
        with engine.connect() as conn:
            revisions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert revisions == [(head_revision(),)]
    finally:
        engine.dispose()
    MetadataStore(database_url).close()  # opening a migrated DB again is a no-op


def test_add_get_list_delete(database_url: str) -> None:
    store = MetadataStore(database_url)
    try:
        for name, version in [("b", "1"), ("a", "10"), ("a", "9"), ("a", "1")]:
            store.add_version(_manifest(name, version))
        refs = [m.ref for m in store.list_versions()]
        assert refs == ["a:1", "a:9", "a:10", "b:1"]
        assert [m.ref for m in store.list_versions("b")] == ["b:1"]
        got = store.get_version("a", "9")
        assert got == _manifest("a", "9").model_copy(update={"created_at": got.created_at})
        assert store.get_version("a", "2") is None
        with pytest.raises(ConflictError):
            store.add_version(_manifest("a", "9"))
        assert store.delete_version("a", "9") is True
        assert store.delete_version("a", "9") is False
        assert store.delete_version("b", "1") is True
        assert [m.ref for m in store.list_versions()] == ["a:1", "a:10"]
    finally:
        store.close()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'sub' / 'lmaas.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_normalize_database_url(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected
