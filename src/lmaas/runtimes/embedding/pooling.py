"""Pooling token embeddings into sentence embeddings, as sentence-transformers does."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Pool ``hidden [batch, seq, dim]`` under ``mask [batch, seq]`` (1 = real token).

    Several modes are concatenated in the given order. Right padding is assumed.
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    parts = [_pool_one(hidden, mask, weights, mode) for mode in modes]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _pool_one(
    hidden: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, mode: str
) -> torch.Tensor:
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "max_tokens":
        return hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    if mode == "lasttoken":
        last = mask.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    if mode == "mean_tokens":
        return summed / counts
    if mode == "mean_sqrt_len_tokens":
        return summed / counts.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")
