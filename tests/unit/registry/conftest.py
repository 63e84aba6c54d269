"""Fixtures of the registry tests: fake HF-layout model dirs, and SQLite + PostgreSQL DBs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from safetensors.numpy import save_file

from lmaas.registry.service import RegistryService

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

MakeModelDir = Callable[..., Path]


def write_model_dir(
    dest: Path,
    *,
    architectures: list[str] | None = None,
    config: dict[str, Any] | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    weights: bool = True,
) -> Path:
    """Write a tiny HF-layout model: config.json, model.safetensors, tokenizer_config.json."""
    dest.mkdir(parents=True, exist_ok=True)
    full_config: dict[str, Any] = {
        "architectures": architectures or ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "max_position_embeddings": 128,
    }
    full_config.update(config or {})
    (dest / "config.json").write_text(json.dumps(full_config))
    if weights:
        tensors = {"embed.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}
        save_file(tensors, str(dest / "model.safetensors"))
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}))
    for relative, data in (extra_files or {}).items():
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


@pytest.fixture
def make_model_dir(tmp_path: Path) -> MakeModelDir:
    """Factory: ``make_model_dir("dirname", architectures=[...], ...)`` under ``tmp_path/src``."""

    def make(dirname: str = "tiny-model", **kwargs: Any) -> Path:
        return write_model_dir(tmp_path / "src" / dirname, **kwargs)

    return make


def _postgres_reachable() -> str | None:
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}"


@pytest.fixture(scope="session")
def postgres_skip_reason() -> str | None:
    """Why PostgreSQL tests skip, or None when the server answers."""
    return _postgres_reachable()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_skip_reason: str | None
) -> Iterator[str]:
    """A fresh, empty metadata DB: a SQLite file, or a private schema in PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lmaas.db'}"
        return
    if postgres_skip_reason is not None:
        pytest.skip(postgres_skip_reason)
    schema = f"lmaas_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty lmaas home."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def registry(home: Path, database_url: str) -> Iterator[RegistryService]:
    """An offline registry over ``home`` and a fresh DB (run once per DB backend)."""
    service = RegistryService(home, database_url, offline=True)
    try:
        yield service
    finally:
        service.close()
