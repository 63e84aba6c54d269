from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_models import build_tiny_causal_lm, build_tiny_embedder
from tests.integration.serverproc import ServerProcess, start_server

ECHO = "lmaas.testing.fake_runners:echo_runner"


def _registry(home: Path) -> RegistryService:
    return RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)


def import_echo(home: Path, source: Path, name: str, **options: str) -> None:
    """Import ``source`` as a new version of ``name`` served by the echo fake runner."""
    with _registry(home) as registry:
        registry.import_model(
            str(source), name=name, task=None, serving={"options": {"runner": ECHO, **options}}
        )


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "chat": build_tiny_causal_lm(root / "tiny-chat", "llama", seed=0),
        "embed": build_tiny_embedder(root / "tiny-embed", seed=0),
    }


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]
) -> Iterator[ServerProcess]:
    """A real server with a tiny chat model and a tiny embedding model."""
    home = tmp_path_factory.mktemp("home")
    registry = _registry(home)
    registry.import_model(str(tiny_dirs["chat"]), name="tiny-chat")
    registry.import_model(
        str(tiny_dirs["embed"]), name="tiny-embed", serving={"matryoshka_dims": [16]}
    )
    registry.close()
    proc = start_server(home, ["tiny-chat", "tiny-embed"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def start_echo_server(home: Path, source: Path, **options: str) -> ServerProcess:
    """A server whose model 'echo' runs the fake echo runner (no torch in the worker)."""
    registry = _registry(home)
    registry.import_model(
        str(source), name="echo", task=None, serving={"options": {"runner": ECHO, **options}}
    )
    registry.close()
    return start_server(home, ["echo"])
