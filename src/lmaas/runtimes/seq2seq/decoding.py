"""What a seq2seq checkpoint's ``generation_config.json`` asks of every decoding step.

Translation and summarisation checkpoints rely on rules in their generation config, not only on
their weights: Marian may never emit ``<pad>`` (``bad_words_ids``), BART's first token is forced
to ``<s>`` (``forced_bos_token_id``) and the last allowed one to ``</s>``
(``forced_eos_token_id``), summarisers set ``min_length`` and ``no_repeat_ngram_size``. These
rules are applied here exactly as ``transformers``' logits processors apply them in
``generate()``: to the one sequence of greedy or sampled decoding, and to every beam of beam
search (:mod:`lmaas.runtimes.seq2seq.beam`).

The config also sets the defaults of a request that names none: ``num_beams`` (Marian opus-mt
and BART summarisers ship 4), ``length_penalty``, ``early_stopping`` (True, False or
``"never"``) and the output length (``max_new_tokens``, else ``max_length`` minus the decoder
start token). A request that does not sample decodes with the checkpoint's ``num_beams``, so
the server gives the tokens ``model.generate(do_sample=False)`` gives, beam search included.
Not applied: the config's ``repetition_penalty``, ``num_beam_groups`` (diverse beam search) and
``do_sample`` (a request samples when it sets ``temperature > 0``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DecodingRules:
    """The per-step rules of one checkpoint (positions count generated tokens from 0)."""

    decoder_start_id: int
    eos_ids: frozenset[int]
    forced_bos_id: int | None = None
    forced_eos_id: int | None = None
    banned_ids: frozenset[int] = frozenset()
    """Single-token ``bad_words_ids``: never generated."""
    min_length: int = 0
    """HF semantics: EOS is banned while the decoder ids (start token included) are fewer."""
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    """The checkpoint's beam search width, for requests that do not sample."""
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    """HF semantics: True, False or ``"never"``."""
    max_new_tokens: int | None = None
    """The checkpoint's output length; None: the decoder's maximum."""

    def forced_token(self, position: int, max_tokens: int, ignore_eos: bool) -> int | None:
        """The token the rules force at output ``position`` (None: the model chooses)."""
        if self.forced_eos_id is not None and not ignore_eos and position == max_tokens - 1:
            return self.forced_eos_id
        if self.forced_bos_id is not None and position == 0:
            return self.forced_bos_id
        return None

    def banned(self, output_ids: Sequence[int], ignore_eos: bool) -> set[int]:
        """Ids the next token may not be, given the tokens generated so far."""
        banned = set(self.banned_ids)
        if not ignore_eos and 1 + len(output_ids) < self.min_length:
            banned |= self.eos_ids
        if self.no_repeat_ngram_size > 0:
            banned |= _repeated_ngram_ids(
                [self.decoder_start_id, *output_ids], self.no_repeat_ngram_size
            )
        return banned


def _repeated_ngram_ids(ids: Sequence[int], size: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``ids`` (HF NoRepeatNGram)."""
    if len(ids) + 1 < size:
        return set()
    prefix = tuple(ids[len(ids) - size + 1 :])
    found: set[int] = set()
    for start in range(len(ids) - size + 1):
        if tuple(ids[start : start + size - 1]) == prefix:
            found.add(ids[start + size - 1])
    return found


def _as_ids(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def read_decoding_rules(model_config: Any, generation_config: Any) -> DecodingRules:
    """Build the rules from the loaded model's config and generation config.

    Raises:
        ValueError: the configs name no decoder start token or no EOS token.
    """

    def pick(name: str) -> Any:
        value = getattr(generation_config, name, None)
        return value if value is not None else getattr(model_config, name, None)

    start = pick("decoder_start_token_id")
    if isinstance(start, list):
        start = start[0] if start else None
    eos_ids = _as_ids(pick("eos_token_id"))
    if start is None or not eos_ids:
        raise ValueError("the model config names no decoder_start_token_id or eos_token_id")
    bad_words = getattr(generation_config, "bad_words_ids", None) or []
    single = frozenset(int(w[0]) for w in bad_words if len(w) == 1)
    if len(single) != len(bad_words):
        _log.warning("multi-token bad_words_ids are not applied; single-token ones are")
    _warn_unapplied(generation_config)
    return DecodingRules(
        decoder_start_id=int(start),
        eos_ids=eos_ids,
        forced_bos_id=_optional_int(pick("forced_bos_token_id")),
        forced_eos_id=_first(pick("forced_eos_token_id")),
        banned_ids=single,
        min_length=int(getattr(generation_config, "min_length", 0) or 0),
        no_repeat_ngram_size=int(getattr(generation_config, "no_repeat_ngram_size", 0) or 0),
        num_beams=max(1, int(getattr(generation_config, "num_beams", 1) or 1)),
        length_penalty=float(_setting(generation_config, "length_penalty", 1.0)),
        early_stopping=_early_stopping(_setting(generation_config, "early_stopping", False)),
        max_new_tokens=_max_new_tokens(generation_config),
    )


def _setting(generation_config: Any, name: str, default: Any) -> Any:
    value = getattr(generation_config, name, None)
    return default if value is None else value


def _early_stopping(value: Any) -> bool | str:
    if value in (True, False, "never"):
        return bool(value) if isinstance(value, bool) else "never"
    raise ValueError(f"generation_config early_stopping must be true, false or 'never': {value!r}")


def _max_new_tokens(generation_config: Any) -> int | None:
    """The output length the config asks for: ``max_new_tokens``, else ``max_length`` less the
    decoder start token (``generate()`` counts it in ``max_length``)."""
    new = getattr(generation_config, "max_new_tokens", None)
    if new is not None:
        return max(1, int(new))
    total = getattr(generation_config, "max_length", None)
    return None if total is None else max(1, int(total) - 1)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _first(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return _optional_int(value)


def _warn_unapplied(generation_config: Any) -> None:
    if int(getattr(generation_config, "num_beam_groups", 1) or 1) > 1:
        _log.warning("generation_config num_beam_groups > 1 is not applied (plain beam search)")
    penalty = getattr(generation_config, "repetition_penalty", 1.0)
    if penalty not in (None, 1.0):
        _log.warning("generation_config repetition_penalty=%s is not applied", penalty)
