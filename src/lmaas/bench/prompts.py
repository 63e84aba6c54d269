"""Random prompts of a set length, and request arrival times."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from lmaas.core.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Common short English words: prompts built from them read as text and tokenize to about one
# token per word in most vocabularies.
_WORD_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any same "
    "tell boy follow came want show also around form three small set put end does another well"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(slots=True, frozen=True)
class Prompt:
    """One request's prompt: token ids or text, and its length in tokens if known exactly."""

    token_ids: list[int] | None
    text: str | None
    num_tokens: int
    exact: bool


class TextTokenizer(Protocol):
    """The part of a ``tokenizers.Tokenizer`` used to size text prompts exactly."""

    def encode_ids(self, text: str) -> list[int]: ...
    def decode_ids(self, ids: list[int]) -> str: ...
    def sample_ids(self, rng: random.Random, count: int) -> list[int]: ...


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float, seed: int
) -> list[float]:
    """Send times in seconds after the start, as ``vllm bench serve`` draws them.

    Gaps are gamma-distributed with shape ``burstiness`` and mean ``1/request_rate``
    (``burstiness = 1`` is a Poisson process); the cumulative times are then rescaled so the last
    request goes out at exactly ``num_requests / request_rate``, which removes seed noise from
    the offered load. An infinite rate sends everything at once.

    Raises:
        InvalidRequestError: for a rate or burstiness that is not positive.
    """
    if request_rate <= 0 or burstiness <= 0:
        raise InvalidRequestError(
            f"request_rate ({request_rate}) and burstiness ({burstiness}) must be positive"
        )
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    offsets: list[float] = []
    total = 0.0
    for _ in range(num_requests):
        total += rng.gammavariate(burstiness, scale)
        offsets.append(total)
    target = num_requests / request_rate
    factor = target / offsets[-1] if offsets[-1] > 0 else 1.0
    return [offset * factor for offset in offsets]


def token_id_prompts(
    num_prompts: int, input_len: int, vocab_size: int, seed: int, *, min_token_id: int = 0
) -> list[Prompt]:
    """Prompts of exactly ``input_len`` random ids in ``[min_token_id, vocab_size)``."""
    if not 0 <= min_token_id < vocab_size:
        raise InvalidRequestError(
            f"min_token_id ({min_token_id}) must lie in [0, vocab_size ({vocab_size}))"
        )
    rng = random.Random(seed)
    return [
        Prompt(
            [rng.randrange(min_token_id, vocab_size) for _ in range(input_len)],
            None,
            input_len,
            True,
        )
        for _ in range(num_prompts)
    ]


def word_prompts(num_prompts: int, input_len: int, seed: int) -> list[Prompt]:
    """Text prompts of ``input_len`` random common words (about that many tokens)."""
    rng = random.Random(seed)
    return [
        Prompt(None, " ".join(rng.choice(_WORDS) for _ in range(input_len)), input_len, False)
        for _ in range(num_prompts)
    ]


def tokenized_prompts(
    num_prompts: int, input_len: int, seed: int, tokenizer: TextTokenizer
) -> list[Prompt]:
    """Text prompts that encode to exactly ``input_len`` tokens with ``tokenizer`` where possible.

    Random ids are decoded to text and re-encoded; decoding and re-encoding may merge or split
    pieces, so the ids are trimmed or topped up a few times (the approach of vLLM's random
    dataset). The count is exact when it converged and recorded as measured otherwise.
    """
    rng = random.Random(seed)
    return [_sized_text(rng, input_len, tokenizer) for _ in range(num_prompts)]


def _sized_text(rng: random.Random, input_len: int, tokenizer: TextTokenizer) -> Prompt:
    ids = tokenizer.sample_ids(rng, input_len)
    text = tokenizer.decode_ids(ids)
    count = len(tokenizer.encode_ids(text))
    for _ in range(10):
        if count == input_len:
            break
        ids = tokenizer.encode_ids(text)
        ids = (
            ids[:input_len]
            if count > input_len
            else ids + tokenizer.sample_ids(rng, input_len - count)
        )
        text = tokenizer.decode_ids(ids)
        count = len(tokenizer.encode_ids(text))
    return Prompt(None, text, count, True)


@dataclass(slots=True)
class HFTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` library (offline, no transformers)."""

    tokenizer: Tokenizer
    sample_pool: list[int]

    @classmethod
    def load(cls, directory: Path) -> HFTokenizer:
        """Load ``directory/tokenizer.json`` (or the file itself).

        Raises:
            InvalidRequestError: the file is missing or ``tokenizers`` is not installed.
        """
        path = directory / "tokenizer.json" if directory.is_dir() else directory
        try:
            # Imported here: tokenizers is an optional (worker) dependency of lmaas.
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise InvalidRequestError(
                "--tokenizer needs the `tokenizers` package (pip install tokenizers)"
            ) from exc
        if not path.is_file():
            raise InvalidRequestError(f"no tokenizer.json at {path}", param="tokenizer")
        tokenizer = Tokenizer.from_file(str(path))
        added = tokenizer.get_added_tokens_decoder().values()
        special = {token.content for token in added if token.special}
        pool = sorted(i for token, i in tokenizer.get_vocab().items() if token not in special)
        return cls(tokenizer, pool)

    def encode_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sample_ids(self, rng: random.Random, count: int) -> list[int]:
        return [rng.choice(self.sample_pool) for _ in range(count)]
