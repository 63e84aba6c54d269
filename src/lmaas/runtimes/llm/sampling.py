"""Next-token selection: greedy, temperature, top-k, top-p, with per-request generators."""

from __future__ import annotations

from collections.abc import Collection

import torch

from lmaas.core.messages import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator owned by one request, so its samples do not depend on its batch neighbours."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    banned_ids: Collection[int] = (),
) -> int:
    """Choose the next token from the last-position ``logits`` (shape ``[vocab]``).

    Args:
        logits: Raw scores; converted to float32 here.
        params: temperature 0 means greedy; otherwise temperature, top_k (0 = off), top_p.
        generator: The request's own random stream, or None for the global one.
        banned_ids: Ids that may not be chosen now (EOS and stop ids before ``min_tokens``).
    """
    scores = logits.float()
    if banned_ids:
        scores = scores.clone()
        scores[list(banned_ids)] = float("-inf")
    if params.temperature <= 0.0:
        return int(torch.argmax(scores).item())
    scores = scores / params.temperature
    if 0 < params.top_k < scores.numel():
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        scores = _apply_top_p(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def _apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    # Drop the low tail whose mass stays within 1 - top_p; the best token always survives.
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted[-1] = False
    remove = remove_sorted.scatter(0, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))
