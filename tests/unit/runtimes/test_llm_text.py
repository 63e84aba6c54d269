"""Stop strings, incremental detokenisation, sampling and chat templates, without a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import ChatMessage, SamplingParams
from lmaas.runtimes.llm.chat_template import ChatTemplate
from lmaas.runtimes.llm.detokenize import IncrementalDetokenizer
from lmaas.runtimes.llm.sampling import make_generator, sample_token
from lmaas.runtimes.llm.stop import StopStringFilter
from lmaas.testing.tiny_models import CHATML_TEMPLATE, build_tokenizer


def test_stop_filter_holds_back_possible_prefixes() -> None:
    stop = StopStringFilter(["</end>", "STOP"])
    assert stop.feed("Hello <") == ("Hello ", False)
    assert stop.feed("/e") == ("", False)
    assert stop.feed("x then ST") == ("</ex then ", False)
    assert stop.feed("OP and more") == ("", True)


def test_stop_filter_picks_the_earliest_match_and_flushes() -> None:
    stop = StopStringFilter(["bb", "ab"])
    assert stop.feed("xxabb") == ("xx", True)
    held = StopStringFilter(["abc"])
    assert held.feed("zab") == ("z", False)
    assert held.flush() == "ab"
    assert StopStringFilter([""]).feed("text") == ("text", False)


def test_detokenizer_never_splits_characters(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = " Grüße 🙂🚀👍🏽 日本語 and ascii"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello"))
    pieces = [detokenizer.push(i) for i in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some ids completed no character on their own


def test_detokenizer_flushes_an_incomplete_tail(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    first_byte_of_emoji = tokenizer.encode("🙂")[0]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer.push(first_byte_of_emoji) == ""
    assert detokenizer.flush() == "\ufffd"


def test_greedy_and_banned_ids() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    greedy = SamplingParams(temperature=0.0)
    assert sample_token(logits, greedy, None) == 1
    assert sample_token(logits, greedy, None, banned_ids={1}) == 3


def test_top_k_and_top_p_restrict_the_choice() -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 4.8])
    generator = make_generator(0, torch.device("cpu"))
    top_k = SamplingParams(temperature=1.0, top_k=2)
    assert {sample_token(logits, top_k, generator) for _ in range(200)} == {1, 2}
    top_p = SamplingParams(temperature=1.0, top_p=0.3)
    assert {sample_token(logits, top_p, generator) for _ in range(50)} == {1}


def test_seeded_generators_repeat() -> None:
    logits = torch.randn(300)
    params = SamplingParams(temperature=1.5)
    runs = []
    for _ in range(2):
        generator = make_generator(42, torch.device("cpu"))
        runs.append([sample_token(logits, params, generator) for _ in range(20)])
    assert runs[0] == runs[1]
    assert make_generator(None, torch.device("cpu")) is None


def test_chat_template_renders_chatml() -> None:
    template = ChatTemplate(CHATML_TEMPLATE, {"bos_token": "<s>"})
    rendered = template.render([ChatMessage("user", "hi")], add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    rendered = template.render([ChatMessage("user", "hi")], add_generation_prompt=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(source: str) -> None:
    template = ChatTemplate(source, {})
    with pytest.raises(InvalidRequestError) as excinfo:
        template.render([ChatMessage("user", "hi")], add_generation_prompt=True)
    assert excinfo.value.param == "messages"


def test_template_errors() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        template.render([ChatMessage("user", "hi")], add_generation_prompt=True)
    with pytest.raises(ModelLoadError):
        ChatTemplate("{% for %}", {})
