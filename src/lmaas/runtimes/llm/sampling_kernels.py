"""Batched token selection without sorting the vocabulary.

On a CPU a full ``sort`` of a ``[64, 32000]`` batch costs ~70 ms and a 64-wide ``topk`` ~2.5 ms,
while a reduction (``sum``, ``amax``) costs ~60 µs. So every function here is built from
reductions over 128-token blocks plus small per-block work:

* :func:`block_argmax`: greedy (``argmax`` itself is ~15x slower than ``amax`` on CPU);
* :func:`inverse_cdf`: one uniform per row, two-level (block, then token) inverse CDF;
* :func:`sample_top_p`: nucleus sampling by rejection (as FlashInfer's sorting-free sampler):
  draw from the distribution, accept if the mass strictly above the drawn token's probability
  is below ``top_p``; otherwise keep only tokens more probable than it and draw again. The
  nucleus is a top set by probability, so every rejected token and everything less probable
  lies outside it, and the accepted token follows the renormalised nucleus exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
MAX_ROUNDS = 8
"""Rejection rounds before the exact (sorting) fallback; ~1 / top_p rounds are expected."""


def _blocked(x: torch.Tensor, fill: float) -> torch.Tensor:
    rows, vocab = x.shape
    pad = (-vocab) % BLOCK
    if pad:
        x = F.pad(x, (0, pad), value=fill)
    return x.view(rows, -1, BLOCK)


def block_argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of ``[rows, vocab]`` (first index on ties), as int64 ``[rows]``."""
    blocks = _blocked(x, float("-inf"))
    best_block = blocks.amax(-1).argmax(-1)
    rows = torch.arange(x.shape[0], device=x.device)
    inner = blocks[rows, best_block].argmax(-1)
    return best_block * BLOCK + inner


def block_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k)`` (values, ids; ties may pick other ids of the same value), through the
    top-k blocks by block max: they hold the k largest values."""
    rows, vocab = x.shape
    num_blocks = (vocab + BLOCK - 1) // BLOCK
    if k > num_blocks or k > BLOCK:
        top = x.topk(k, dim=-1)
        return top.values, top.indices
    blocks = _blocked(x, float("-inf"))
    best_blocks = blocks.amax(-1).topk(k, dim=-1).indices
    candidates = blocks.gather(1, best_blocks[:, :, None].expand(-1, -1, BLOCK)).reshape(rows, -1)
    values, where = candidates.topk(k, dim=-1)
    ids = best_blocks.gather(1, where // BLOCK) * BLOCK + where % BLOCK
    return values, ids


def keep_where(weights: torch.Tensor, floor: torch.Tensor, strict: bool) -> torch.Tensor:
    """``weights * (weights > floor)`` (or ``>=``) with ``floor`` ``[rows, 1]``, as a new tensor.

    A float-typed comparison output is ~7x faster on CPU than a bool mask plus ``where``.
    """
    out = torch.empty_like(weights)
    (torch.gt if strict else torch.ge)(weights, floor, out=out)
    return out.mul_(weights)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one id per row with probability proportional to ``weights`` (non-negative, each row
    with positive mass); ``uniforms`` in (0, 1], shape ``[rows]``. Never returns a zero-weight id.
    """
    blocks = _blocked(weights, 0.0)
    sums = blocks.sum(-1)
    cum = sums.cumsum(-1)
    target = uniforms.to(cum.dtype) * cum[:, -1]
    block = torch.searchsorted(cum, target.unsqueeze(1)).squeeze(1)
    block.clamp_(max=sums.shape[1] - 1)
    before = (cum.gather(1, block[:, None]) - sums.gather(1, block[:, None])).squeeze(1)
    rows = torch.arange(weights.shape[0], device=weights.device)
    inner_w = blocks[rows, block]
    inner_cum = inner_w.cumsum(-1)
    inner = torch.searchsorted(inner_cum, (target - before).unsqueeze(1)).squeeze(1)
    # Rounding can put the target just outside the block's positive-weight range: clamp to it.
    positions = torch.arange(BLOCK, device=weights.device)
    positive = inner_w > 0
    first = torch.where(positive, positions, BLOCK).amin(-1)
    last = torch.where(positive, positions, -1).amax(-1)
    inner = torch.maximum(torch.minimum(inner, last), first)
    return block * BLOCK + inner


def apply_floors(probs: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``probs`` with zeros for the ids below each row's top-k cut (``top_k`` 0 = off) or below
    ``min_p * max prob`` (0 = off)."""
    floor = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
    if bool((min_p > 0).any()):
        floor = min_p.to(probs.dtype) * probs.amax(-1)
    k_rows = (top_k > 0).nonzero().squeeze(1)
    if k_rows.numel():
        ks = top_k[k_rows].clamp(max=probs.shape[1])
        sub = probs if k_rows.numel() == probs.shape[0] else probs[k_rows]
        kth = block_topk(sub, int(ks.max()))[0]
        kth_value = kth.gather(1, (ks - 1)[:, None]).squeeze(1)
        floor[k_rows] = torch.maximum(floor[k_rows], kth_value)
    return keep_where(probs, floor[:, None], strict=False)


def sample_top_p(probs: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one id per row from ``probs`` restricted to each row's nucleus.

    Args:
        probs: ``[rows, vocab]`` non-negative weights (top-k / min-p already applied).
        top_p: ``[rows]``; 1.0 disables the nucleus for that row.
        uniforms: ``[rows, MAX_ROUNDS + 1]`` in (0, 1]; round ``r`` uses column ``r``, so each
            row's draws depend only on its own uniforms.
    """
    tokens = inverse_cdf(probs, uniforms[:, 0])
    active = (top_p < 1.0).nonzero().squeeze(1)
    if active.numel() == 0:
        return tokens
    limit = top_p.to(probs.dtype) * probs.sum(-1)
    work = probs if active.numel() == probs.shape[0] else probs[active]
    for round_index in range(1, MAX_ROUNDS + 1):
        drawn = work.gather(1, tokens[active][:, None])
        above = keep_where(work, drawn, strict=True)
        rejected = above.sum(-1) >= limit[active]
        if not bool(rejected.any()):
            return tokens
        active, work = active[rejected], above[rejected]
        tokens[active] = inverse_cdf(work, uniforms[active, round_index])
    return _finish_by_sort(probs, tokens, active, limit, uniforms[:, -1])


def _finish_by_sort(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    active: torch.Tensor,
    limit: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Exact nucleus by sorting, for the rare rows still rejected after MAX_ROUNDS."""
    drawn = probs[active].gather(1, tokens[active][:, None])
    above = keep_where(probs[active], drawn, strict=True)
    accepted = above.sum(-1) < limit[active]
    rows = active[~accepted]
    if rows.numel() == 0:
        return tokens
    sorted_probs, order = probs[rows].sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs.masked_fill_(mass_before >= limit[rows][:, None], 0.0)
    picked = inverse_cdf(sorted_probs, uniforms[rows])
    tokens[rows] = order.gather(1, picked[:, None]).squeeze(1)
    return tokens
