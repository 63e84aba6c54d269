"""Guided decoding: random logits + the guide always give JSON that parses and validates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sampler_refs import slot
from transformers import PreTrainedTokenizerFast

from lmaas.core.errors import InvalidRequestError
from lmaas.runtimes.llm.batch import SamplingConfig
from lmaas.runtimes.llm.guided import GrammarCompiler, LlgGuide, make_guide
from lmaas.runtimes.llm.sampler import Sampler
from lmaas.testing.tiny_models import build_tokenizer

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "kind": {"enum": ["cat", "dog"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "kind", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    dest: Path = tmp_path_factory.mktemp("tok")
    build_tokenizer(dest)
    return PreTrainedTokenizerFast.from_pretrained(str(dest))


@pytest.fixture(scope="module")
def compiler(tokenizer: PreTrainedTokenizerFast) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=len(tokenizer) + 40)


def _closing_bias(tokenizer: PreTrainedTokenizerFast) -> tuple[tuple[int, float], ...]:
    """Push random logits toward closing tokens so outputs end within the step limit."""
    ids = {tokenizer.eos_token_id}
    for text in ('"', "}", "]", '"}', "]}", "0"):
        ids.update(tokenizer.encode(text, add_special_tokens=False)[:1])
    return tuple((token_id, 4.0) for token_id in sorted(ids))


def _generate(
    guide: LlgGuide, vocab: int, seed: int, bias: tuple[tuple[int, float], ...]
) -> list[int]:
    sampler = Sampler(torch.device("cpu"))
    config = SamplingConfig(temperature=1.0, seed=seed, logit_bias=bias)
    history: list[int] = [1]
    noise = torch.Generator().manual_seed(seed)
    for _ in range(400):
        s = slot(0, config, history=history, num_prompt=1)
        s.guide = guide
        logits = torch.randn(1, vocab, generator=noise) * 2.0
        token_id = sampler.sample(logits, [s])[0].token_id
        history.append(token_id)
        guide.accept(token_id)
        if guide.is_finished():
            return history[1:]
    raise AssertionError("guided generation did not finish")


def _validate(value: Any, schema: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:  # manual checks for the schemas used here
        assert isinstance(value, dict)
        assert set(value) <= set(schema.get("properties", value))
        assert set(schema.get("required", [])) <= set(value)
        return
    jsonschema.validate(value, schema)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_guided_output_parses_and_validates(
    tokenizer: PreTrainedTokenizerFast, compiler: GrammarCompiler, seed: int, kind: str
) -> None:
    schema = PERSON if kind == "json_schema" else {"type": "object"}
    fmt: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        fmt["json_schema"] = {"name": "person", "schema": PERSON}
    guide = compiler(json.dumps(fmt))
    assert guide is not None
    ids = _generate(guide, len(tokenizer) + 40, seed, _closing_bias(tokenizer))
    text = tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id])
    _validate(json.loads(text), schema)


def test_allowed_ids_match_the_bitmask(compiler: GrammarCompiler) -> None:
    guide = make_guide({"type": "json_object"}, compiler)
    assert guide is not None
    allowed = guide.allowed_token_ids()
    assert allowed is not None and 0 < len(allowed) < 100
    words = torch.zeros(30, dtype=torch.int32)
    guide.fill_bitmask(words)
    bits = [i for i in range(30 * 32) if (int(words[i // 32]) >> (i % 32)) & 1]
    assert bits == allowed


def test_text_and_cache(compiler: GrammarCompiler) -> None:
    assert compiler(json.dumps({"type": "text"})) is None
    first = compiler.make_guide({"type": "json_object"})
    second = compiler.make_guide({"type": "json_object"})
    assert first is not None and second is not None and first is not second


@pytest.mark.parametrize(
    "fmt",
    [
        "not json",
        "[1]",
        json.dumps({"type": "xml"}),
        json.dumps({"type": "json_schema"}),
        json.dumps({"type": "json_schema", "json_schema": {"schema": "x"}}),
        json.dumps({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}),
    ],
)
def test_invalid_formats_are_400(compiler: GrammarCompiler, fmt: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler(fmt)
    assert info.value.param == "response_format"
