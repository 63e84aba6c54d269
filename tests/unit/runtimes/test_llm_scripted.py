"""Output processing (stop conditions, detokenisation) with the model's choices scripted.

``ScriptedRunner`` replaces the forward pass with logits that make the scripted token the best
one, so every sampling and text path runs for real on known tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtimes_helpers import Outputs, make_spec, run_to_completion
from transformers import AutoTokenizer

from lmaas.core.messages import GenerateRequest, SamplingParams
from lmaas.runtimes.llm.torch import TorchCausalLMRunner, _Running

_FALLBACK_SCORE = 5.0


class ScriptedRunner(TorchCausalLMRunner):
    """Generates ``script`` token by token; ``fallback`` wins wherever the script is banned."""

    def __init__(self, model_dir: Path, script: list[int], fallback: int) -> None:
        super().__init__(make_spec(model_dir))
        self.script = script
        self.fallback = fallback

    def _next_logits(self, entry: _Running) -> torch.Tensor:
        step = len(entry.seq.output_ids)
        logits = torch.zeros(self._vocab_size)
        logits[self.fallback] = _FALLBACK_SCORE
        logits[self.script[step % len(self.script)]] = 10.0
        return logits


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dirs: dict[str, Path]) -> object:
    return AutoTokenizer.from_pretrained(tiny_lm_dirs["llama"])


def _generate(
    tiny_lm_dirs: dict[str, Path], script: list[int], fallback: int = 0, **sampling: object
) -> Outputs:
    runner = ScriptedRunner(tiny_lm_dirs["llama"], script, fallback)
    runner.load()
    params = SamplingParams(temperature=0.0, **sampling)  # type: ignore[arg-type]
    runner.add_request(GenerateRequest("r", params, prompt="Hello"))
    return run_to_completion(runner)


def _assert_no_split_characters(outputs: Outputs) -> None:
    for delta in outputs.deltas["r"]:
        assert "\ufffd" not in delta.text


def test_multibyte_characters_never_split(tiny_lm_dirs: dict[str, Path], tokenizer: object) -> None:
    text = "Zürich 🙂🚀 日本語 👍 naïve"
    script = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    assert len(script) > len(text.split())  # the emoji really span several tokens
    outputs = _generate(tiny_lm_dirs, script, max_tokens=len(script))
    _assert_no_split_characters(outputs)
    assert outputs.text("r") == text
    assert outputs.finish_reason("r") == "length"


def test_stop_string_truncates_and_never_leaks_a_prefix(
    tiny_lm_dirs: dict[str, Path], tokenizer: object
) -> None:
    text = "one two three four five six"
    script = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    outputs = _generate(tiny_lm_dirs, script, max_tokens=len(script), stop=["xyz", "e fo"])
    assert outputs.text("r") == "one two thre"
    assert outputs.finish_reason("r") == "stop"
    # Each delta only ever extends the final text: nothing was emitted and then retracted.
    emitted = ""
    for delta in outputs.deltas["r"]:
        emitted += delta.text
        assert "one two thre".startswith(emitted)


def test_held_back_prefix_is_released_when_no_stop_follows(
    tiny_lm_dirs: dict[str, Path], tokenizer: object
) -> None:
    text = "one two thr"
    script = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    outputs = _generate(tiny_lm_dirs, script, max_tokens=len(script), stop=["three!"])
    assert outputs.text("r") == text
    assert outputs.finish_reason("r") == "length"


def test_eos_stops_without_its_text(tiny_lm_dirs: dict[str, Path], tokenizer: object) -> None:
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    hi = tokenizer.encode("hi", add_special_tokens=False)  # type: ignore[attr-defined]
    outputs = _generate(tiny_lm_dirs, [*hi, eos], max_tokens=10)
    assert outputs.text("r") == "hi"
    assert outputs.finish_reason("r") == "stop"
    assert outputs.token_ids("r") == [*hi, eos]


def test_ignore_eos_keeps_generating(tiny_lm_dirs: dict[str, Path], tokenizer: object) -> None:
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    outputs = _generate(tiny_lm_dirs, [eos], max_tokens=4, ignore_eos=True)
    assert outputs.token_ids("r") == [eos] * 4
    assert outputs.finish_reason("r") == "length"


def test_stop_token_ids_and_min_tokens(tiny_lm_dirs: dict[str, Path], tokenizer: object) -> None:
    stop_id, fallback = tokenizer.encode("!")[0], tokenizer.encode("a")[0]  # type: ignore[attr-defined]
    outputs = _generate(tiny_lm_dirs, [stop_id], fallback, max_tokens=10, stop_token_ids=[stop_id])
    assert outputs.token_ids("r") == [stop_id]
    assert outputs.finish_reason("r") == "stop"
    assert outputs.text("r") == ""

    outputs = _generate(
        tiny_lm_dirs, [stop_id], fallback, max_tokens=10, stop_token_ids=[stop_id], min_tokens=3
    )
    assert outputs.token_ids("r") == [fallback, fallback, fallback, stop_id]
    assert outputs.text("r") == "aaa"
