"""Batched logits processors for :class:`lmaas.runtimes.llm.sampler.Sampler`.

Every function works on a ``[rows, vocab]`` float32 tensor in place and takes only the rows that
use the feature, so one call costs a few torch ops for the whole batch, never one op per row.
Index lists are built in Python (they are short: biases, banned ids, histories) and sent to the
device once.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import chain
from typing import Protocol, runtime_checkable

import torch

from lmaas.runtimes.llm.batch import SeqSlot, TokenGuide

NEG_INF = float("-inf")
BITS_PER_WORD = 32


@runtime_checkable
class BitmaskGuide(Protocol):
    """A :class:`TokenGuide` that writes its allowed set as a bitmask (fast path).

    Bit ``i % 32`` of ``row[i // 32]`` is set when token ``i`` is allowed. ``row`` is a
    contiguous int32 CPU tensor of ``ceil(vocab / 32)`` words, zero-filled by the caller; a guide
    whose tokenizer has fewer tokens than the model's vocab writes only its own words.
    """

    def fill_bitmask(self, row: torch.Tensor) -> None: ...


def _index_tensors(
    pairs: Sequence[tuple[int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).to(device)
    return flat[:, 0], flat[:, 1]


def apply_logit_bias(logits: torch.Tensor, slots: Sequence[SeqSlot], rows: list[int]) -> None:
    """Add each row's ``logit_bias`` (token id → bias) to its logits; ids outside the vocabulary
    are ignored (the API cannot know the vocabulary size)."""
    vocab = logits.shape[1]
    pairs: list[tuple[int, int]] = []
    values: list[float] = []
    for row in rows:
        for token_id, bias in slots[row].sampling.logit_bias:
            if not 0 <= token_id < vocab:
                continue
            pairs.append((row, token_id))
            values.append(bias)
    if not pairs:
        return
    index = _index_tensors(pairs, logits.device)
    bias_values = torch.tensor(values, dtype=logits.dtype, device=logits.device)
    logits.index_put_(index, bias_values, accumulate=True)


def apply_banned(logits: torch.Tensor, slots: Sequence[SeqSlot], rows: list[int]) -> None:
    """Set each row's ``banned_token_ids`` to -inf (never sampled)."""
    vocab = logits.shape[1]
    pairs = [
        (row, token_id)
        for row in rows
        for token_id in slots[row].banned_token_ids
        if 0 <= token_id < vocab
    ]
    if pairs:
        index = _index_tensors(pairs, logits.device)
        logits.index_put_(index, torch.tensor(NEG_INF, device=logits.device))


def allowed_mask(guides: Sequence[TokenGuide], vocab: int) -> torch.Tensor | None:
    """``[len(guides), vocab]`` bool mask of allowed ids (CPU); None when no guide constrains.

    Guides with ``fill_bitmask`` write bits straight into one int32 tensor; the others return
    id lists (slower, but any :class:`TokenGuide` works).
    """
    words = (vocab + BITS_PER_WORD - 1) // BITS_PER_WORD
    bitmask = torch.zeros((len(guides), words), dtype=torch.int32)
    constrained = False
    for i, guide in enumerate(guides):
        if isinstance(guide, BitmaskGuide):
            guide.fill_bitmask(bitmask[i])
            constrained = True
            continue
        allowed = guide.allowed_token_ids()
        if allowed is None:
            bitmask[i].fill_(-1)
            continue
        constrained = True
        _set_bits(bitmask[i], [t for t in allowed if 0 <= t < vocab])
    if not constrained:
        return None
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(len(guides), words * BITS_PER_WORD)[:, :vocab].bool()


def _set_bits(row: torch.Tensor, token_ids: list[int]) -> None:
    if not token_ids:
        return
    ids = torch.tensor(token_ids, dtype=torch.long)
    values = torch.ones(len(token_ids), dtype=torch.int64) << (ids % BITS_PER_WORD)
    words = torch.zeros(row.numel(), dtype=torch.int64)
    words.index_add_(0, ids // BITS_PER_WORD, values)
    # Two's-complement wrap: bit 31 set means a negative int32.
    row.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def apply_guides(logits: torch.Tensor, slots: Sequence[SeqSlot], rows: list[int]) -> None:
    """Keep only the ids each row's guide allows."""
    guides = [slot.guide for row in rows if (slot := slots[row]).guide is not None]
    mask = allowed_mask(guides, logits.shape[1])
    if mask is None:
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(~mask.to(logits.device), NEG_INF)
    logits.index_copy_(0, index, sub)


def _history_pairs(
    slots: Sequence[SeqSlot], rows: list[int], outputs_only: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) for every token of each row's history (or output only)."""
    seqs = [
        slots[r].history[slots[r].num_prompt_tokens :] if outputs_only else slots[r].history
        for r in rows
    ]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    # array('q') reads the ints in C: ~3x faster than torch.tensor on a long Python list.
    flat = array("q", chain.from_iterable(seqs))
    tokens = torch.frombuffer(flat, dtype=torch.int64).clone() if flat else torch.empty(0).long()
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    return row_ids.to(device), tokens.to(device)


def apply_repetition_penalty(
    logits: torch.Tensor, slots: Sequence[SeqSlot], rows: list[int]
) -> None:
    """HF semantics over prompt + output: positive logits divided, negative multiplied."""
    row_ids, tokens = _history_pairs(slots, rows, outputs_only=False, device=logits.device)
    if tokens.numel() == 0:
        return
    penalty_of_row = torch.ones(logits.shape[0], dtype=logits.dtype)
    penalty_of_row[rows] = torch.tensor(
        [slots[r].sampling.repetition_penalty for r in rows], dtype=logits.dtype
    )
    penalty = penalty_of_row.to(logits.device)[row_ids]
    values = logits[row_ids, tokens]
    # A token seen twice is written twice with the same value: penalised once.
    logits[row_ids, tokens] = torch.where(values > 0, values / penalty, values * penalty)


def apply_presence_frequency(
    logits: torch.Tensor, slots: Sequence[SeqSlot], rows: list[int]
) -> None:
    """OpenAI semantics over output tokens: ``logit -= presence * (count > 0) + freq * count``."""
    row_ids, tokens = _history_pairs(slots, rows, outputs_only=True, device=logits.device)
    if tokens.numel() == 0:
        return
    vocab = logits.shape[1]
    keys, counts = torch.unique(row_ids * vocab + tokens, return_counts=True)
    key_rows, key_tokens = keys // vocab, keys % vocab
    presence = torch.zeros(logits.shape[0], dtype=logits.dtype)
    frequency = torch.zeros(logits.shape[0], dtype=logits.dtype)
    index = torch.tensor(rows, dtype=torch.long)
    presence[index] = torch.tensor([slots[r].sampling.presence_penalty for r in rows])
    frequency[index] = torch.tensor([slots[r].sampling.frequency_penalty for r in rows])
    presence, frequency = presence.to(logits.device), frequency.to(logits.device)
    delta = presence[key_rows] + frequency[key_rows] * counts.to(logits.dtype)
    logits.index_put_((key_rows, key_tokens), -delta, accumulate=True)
