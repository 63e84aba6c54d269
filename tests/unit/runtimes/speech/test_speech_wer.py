"""The word error rate helper the speech end-to-end test relies on."""

from __future__ import annotations

import pytest

from lmaas.testing.wer import normalize_words, word_error_rate


def test_normalize() -> None:
    assert normalize_words("The Dog, please! It's 9.") == ["the", "dog", "please", "it's", "9"]


@pytest.mark.parametrize(
    ("hypothesis", "expected"),
    [
        ("the quick brown fox", 0.0),
        ("The quick, brown fox.", 0.0),
        ("the quick brown box", 0.25),  # one substitution
        ("the brown fox", 0.25),  # one deletion
        ("the very quick brown fox", 0.25),  # one insertion
        ("", 1.0),
        ("a b c d e f", 1.5),  # more insertions than reference words
    ],
)
def test_word_error_rate(hypothesis: str, expected: float) -> None:
    assert word_error_rate("the quick brown fox", hypothesis) == pytest.approx(expected)


def test_empty_reference_is_refused() -> None:
    with pytest.raises(ValueError):
        word_error_rate("...", "words")
