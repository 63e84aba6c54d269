from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from lmaas.bench.prompts import (
    HFTokenizer,
    arrival_offsets,
    token_id_prompts,
    tokenized_prompts,
    word_prompts,
)
from lmaas.bench.serve import BenchConfig, request_body
from lmaas.core.errors import InvalidRequestError


def test_poisson_arrivals_are_seeded_and_end_at_n_over_rate() -> None:
    first = arrival_offsets(200, 10.0, 1.0, seed=3)
    assert first == arrival_offsets(200, 10.0, 1.0, seed=3)
    assert first != arrival_offsets(200, 10.0, 1.0, seed=4)
    assert first[-1] == pytest.approx(20.0)
    assert all(b >= a for a, b in itertools.pairwise(first))
    gaps = [b - a for a, b in zip([0.0, *first], first, strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    # Exponential gaps have a coefficient of variation of 1; constant gaps would have 0.
    assert 0.75 < cv < 1.25


def test_high_burstiness_gives_steady_gaps() -> None:
    offsets = arrival_offsets(100, 5.0, 1000.0, seed=0)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert max(gaps) - min(gaps) < 0.05


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(4, math.inf, 1.0, seed=0) == [0.0] * 4


def test_bad_rates_are_refused() -> None:
    with pytest.raises(InvalidRequestError):
        arrival_offsets(4, 0.0, 1.0, seed=0)


def test_token_id_prompts_have_the_exact_length_in_range() -> None:
    prompts = token_id_prompts(5, 16, 100, seed=1)
    assert prompts == token_id_prompts(5, 16, 100, seed=1)
    for prompt in prompts:
        assert prompt.token_ids is not None and len(prompt.token_ids) == 16
        assert all(0 <= t < 100 for t in prompt.token_ids)
        assert prompt.exact and prompt.num_tokens == 16


def test_word_prompts_have_the_word_count() -> None:
    (prompt,) = word_prompts(1, 12, seed=0)
    assert prompt.text is not None and len(prompt.text.split()) == 12
    assert not prompt.exact


def test_tokenized_prompts_encode_to_the_requested_length(tmp_path: Path) -> None:
    from lmaas.testing.tiny_models import build_tokenizer

    build_tokenizer(tmp_path)
    tokenizer = HFTokenizer.load(tmp_path)
    prompts = tokenized_prompts(8, 32, seed=0, tokenizer=tokenizer)
    exact = [p for p in prompts if len(tokenizer.encode_ids(p.text or "")) == 32]
    assert len(exact) >= 6
    assert all(p.num_tokens == len(tokenizer.encode_ids(p.text or "")) for p in prompts)


def test_missing_tokenizer_is_an_invalid_request(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"tokenizer\.json"):
        HFTokenizer.load(tmp_path)


def test_request_body_for_completions_and_chat() -> None:
    config = BenchConfig(base_url="http://x", model="m", output_len=7, extra_body={"top_k": 5})
    (prompt,) = token_id_prompts(1, 3, 10, seed=0)
    body = request_body(config, prompt)
    assert body["prompt"] == prompt.token_ids
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["top_k"] == 5
    chat = BenchConfig(base_url="http://x", model="m", endpoint="/v1/chat/completions")
    (words,) = word_prompts(1, 3, seed=0)
    assert request_body(chat, words)["messages"] == [{"role": "user", "content": words.text}]


@pytest.mark.parametrize(
    "kwargs",
    [{"endpoint": "/v1/embeddings"}, {"num_prompts": 0}, {"max_concurrency": 0}, {"warmup": -1}],
)
def test_config_refuses_unusable_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        BenchConfig(base_url="http://x", model="m", **kwargs)  # type: ignore[arg-type]
