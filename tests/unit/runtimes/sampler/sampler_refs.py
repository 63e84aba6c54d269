"""Straightforward (per-row, unvectorised) references for the sampler tests."""

from __future__ import annotations

from collections import Counter

import torch

from lmaas.runtimes.llm.batch import SamplingConfig, SeqSlot

VOCAB = 300


def slot(
    seq_id: int,
    config: SamplingConfig,
    history: list[int] | None = None,
    num_prompt: int = 0,
    banned: frozenset[int] = frozenset(),
) -> SeqSlot:
    hist = history if history is not None else [1, 2, 3]
    return SeqSlot(
        seq_id=seq_id,
        token_ids=[hist[-1]],
        start_pos=len(hist) - 1,
        block_table=[0],
        sample=True,
        sampling=config,
        history=hist,
        num_prompt_tokens=num_prompt,
        banned_token_ids=banned,
    )


def reference_processed(logits: torch.Tensor, s: SeqSlot) -> torch.Tensor:
    """One row through bias, bans, repetition and presence/frequency penalties, in plain loops."""
    row = logits.clone()
    for token_id, bias in s.sampling.logit_bias:
        row[token_id] += bias
    for token_id in s.banned_token_ids:
        row[token_id] = float("-inf")
    rp = s.sampling.repetition_penalty
    for token_id in set(s.history):
        value = float(row[token_id])
        row[token_id] = value / rp if value > 0 else value * rp
    counts = Counter(s.history[s.num_prompt_tokens :])
    for token_id, count in counts.items():
        row[token_id] -= s.sampling.presence_penalty + s.sampling.frequency_penalty * count
    return row


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
