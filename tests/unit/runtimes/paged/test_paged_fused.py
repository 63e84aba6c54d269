"""The layer stages of ``fused.py``: the ``compile`` serving option, the eager formulas, and
the inductor-compiled stages decoding like transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from paged_helpers import generate_greedy, load_runner, random_prompts
from test_paged_equivalence import PROMPT_LENGTHS, _hf_greedy

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.llm.paged.fused import (
    EAGER,
    compile_mode,
    decode_softmax,
    rotary,
    wants_compile,
)
from lmaas.runtimes.llm.paged.rope import apply_rope

CPU = torch.device("cpu")


def test_compile_option_values() -> None:
    assert compile_mode({}) == "auto"
    assert compile_mode({"compile": " OFF "}) == "off"
    assert compile_mode({"compile": "on"}) == "on"
    with pytest.raises(ModelLoadError, match="compile must be one of"):
        compile_mode({"compile": "yes"})
    assert wants_compile("on", CPU)
    assert not wants_compile("off", CPU)
    assert not wants_compile("auto", CPU)  # measured no faster on the reference CPU


def test_auto_runs_eager(tiny_lm_dirs: dict[str, Path]) -> None:
    runner, _ = load_runner(tiny_lm_dirs["llama"], dtype="bfloat16")
    assert not runner.compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_softmax_is_bit_identical_to_the_two_pass_form(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 5, 3, 40, generator=generator).to(dtype)
    bias = torch.zeros(5, 1, 40)
    bias[:, :, 33:] = float("-inf")
    expected = torch.softmax(scores.float() * 0.125 + bias, dim=-1).to(dtype)
    assert torch.equal(decode_softmax(scores, bias, 0.125), expected)


def test_rotary_splits_and_rotates() -> None:
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, dim = 4, 2, 8
    qkv = torch.randn(3, heads + 2 * kv_heads, dim, generator=generator)
    cos, sin = (
        torch.randn(3, 1, dim, generator=generator),
        torch.randn(3, 1, dim, generator=generator),
    )
    q, k, v = rotary(qkv, cos, sin, None, heads, kv_heads, 1e-6)
    rotated = apply_rope(qkv[:, : heads + kv_heads], cos, sin)
    assert torch.equal(q, rotated[:, :heads])
    assert torch.equal(k, rotated[:, heads:])
    assert torch.equal(v, qkv[:, heads + kv_heads :])
    assert EAGER.rotary is rotary


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch inductor needs a C++ compiler")
def test_compiled_stages_decode_like_transformers(tiny_lm_dirs: dict[str, Path]) -> None:
    """qwen3 exercises every stage (per-head q/k norm too); fp32 greedy stays token-identical."""
    model_dir = tiny_lm_dirs["qwen3"]
    runner, _ = load_runner(model_dir, num_blocks=96, options={"compile": "on"})
    assert runner.compiled
    prompts = random_prompts(PROMPT_LENGTHS, runner.config.vocab_size, seed=2)
    expected = _hf_greedy(model_dir, prompts, 24)
    got = generate_greedy(runner, prompts, 24, chunk_size=8, shuffle_blocks=True, num_blocks=96)
    assert got == expected
