"""Tiny random-weight models, built once per session, and helpers to drive runners."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtimes_helpers import make_spec

from lmaas.runtimes.llm.torch import TorchCausalLMRunner
from lmaas.testing.tiny_models import FAMILIES, build_tiny_causal_lm, build_tiny_embedder
from lmaas.testing.tiny_seq2seq import SHAPES, build_tiny_seq2seq


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {family: build_tiny_causal_lm(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def seq2seq_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight T5, Marian and BART models."""
    root = tmp_path_factory.mktemp("tiny-seq2seq")
    return {shape: build_tiny_seq2seq(root / shape, shape) for shape in SHAPES}


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedder(tmp_path_factory.mktemp("tiny-embedder") / "model")


@pytest.fixture(scope="session")
def llama_runner(tiny_lm_dirs: dict[str, Path]) -> TorchCausalLMRunner:
    """A loaded fp32 llama runner shared by tests that leave it idle when they finish."""
    runner = TorchCausalLMRunner(make_spec(tiny_lm_dirs["llama"], max_batch_size=8))
    runner.load()
    return runner
