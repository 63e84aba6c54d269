"""The tiny-model builders: layout, determinism, tokenizer round trips, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from lmaas.testing import tiny_models


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_files(tiny_lm_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = tiny_models.build_tiny_causal_lm(tmp_path / "llama", "llama", seed=0)
    other = tiny_models.build_tiny_causal_lm(tmp_path / "other", "llama", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(tiny_lm_dirs["llama"] / name)
    assert _digest(other / "model.safetensors") != _digest(again / "model.safetensors")


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_decoder_layout(tiny_lm_dirs: dict[str, Path], family: str) -> None:
    model_dir = tiny_lm_dirs[family]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file()
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert config.model_type == family
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token and tokenizer.pad_token


def test_tokenizer_round_trips_any_text(tiny_lm_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dirs["llama"])
    assert 512 <= len(tokenizer) <= 1000
    text = "Ünïcödé ✓ 🙂🚀 \u200b \U0001d518 — tabs\tand\nnewlines"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert "<|im_start|>" in tokenizer.chat_template


def test_cli_builds_the_demo_embedder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_models.main([str(tmp_path / "e"), "--kind", "embedding"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "e")
    modules = json.loads((tmp_path / "e" / "modules.json").read_text())
    assert modules[-1]["type"] == "sentence_transformers.models.Normalize"
    assert (tmp_path / "e" / "1_Pooling" / "config.json").is_file()


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        tiny_models.build_tiny_causal_lm(tmp_path, "bloom")
