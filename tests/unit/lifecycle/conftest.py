"""A registry holding tiny random-weight models of every evaluated task (built once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_models import build_tiny_causal_lm, build_tiny_embedder
from lmaas.testing.tiny_seq2seq import build_tiny_seq2seq
from lmaas.testing.tiny_speech import build_tiny_whisper
from lmaas.testing.tiny_text_heads import build_tiny_classifier, build_tiny_cross_encoder
from lmaas.testing.tiny_vision import build_tiny_image_classifier


@pytest.fixture(scope="session")
def eval_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An lmaas home with tiny-cls, tiny-img, tiny-embed, tiny-t5, tiny-chat, tiny-rerank and
    tiny-whisper (6 new tokens a window at most) imported."""
    root = tmp_path_factory.mktemp("eval-models")
    home = root / "home"
    home.mkdir()
    builders = {
        "tiny-cls": lambda d: build_tiny_classifier(d, seed=6),
        "tiny-img": lambda d: build_tiny_image_classifier(d, seed=3),
        "tiny-embed": lambda d: build_tiny_embedder(d, seed=0),
        "tiny-t5": lambda d: build_tiny_seq2seq(d, "t5", seed=0),
        "tiny-chat": lambda d: build_tiny_causal_lm(d, "llama", seed=0),
        "tiny-rerank": lambda d: build_tiny_cross_encoder(d, seed=5),
        "tiny-whisper": lambda d: build_tiny_whisper(d, seed=1, num_layers=1),
    }
    serving = {"tiny-whisper": {"options": {"max_new_tokens": "6"}}}
    with RegistryService(home, database_url(home), offline=True) as registry:
        for name, build in builders.items():
            registry.import_model(str(build(root / name)), name=name, serving=serving.get(name))
    return home


def database_url(home: Path) -> str:
    return f"sqlite:///{home / 'lmaas.db'}"


@pytest.fixture
def eval_registry(eval_home: Path) -> Iterator[RegistryService]:
    with RegistryService(eval_home, database_url(eval_home), offline=True) as registry:
        yield registry
