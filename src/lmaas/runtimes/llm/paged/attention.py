"""Attention over the paged KV cache for one layer and one step.

Where the runner built the C kernel of ``cpu_kernels.py`` (bf16 on a CPU), every row (decode
rows and prompt tokens alike, causal by their context length) attends through it, straight
from the cache. Otherwise, decode rows use two batched bf16 matmuls with a float32 softmax
instead of SDPA: on the reference CPU, SDPA with one query dispatches to a flash kernel that
measured ~14x slower at batch 64 (0.41 vs 5.9 ms per layer, benchmarks/runner_step.py). Their
keys and values come from
the decode view (``decode_view.py``) or, without one, from a per-step gather; either way a
contiguous operand, because bmm copies any strided one first. Prefill chunks use SDPA, which
measured ~2x faster than matmuls for 64 x 128 fresh prompts (31 vs 69 ms per layer).
Grouped-query attention never repeats K/V: queries are viewed as ``[kv_heads, ..., group, d]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmaas.runtimes.llm.paged.fused import decode_softmax
from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.step import ContinuedPrefill, DecodeGroup, FreshPrefill, StepInputs

Softmax = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cache: PagedKVCache,
    layer: int,
    inputs: StepInputs,
    scale: float,
    softmax: Softmax = decode_softmax,
) -> torch.Tensor:
    """Store ``k``/``v`` in the cache, then attend; returns ``[T, heads * head_dim]``.

    Args:
        q: ``[T, heads, head_dim]`` queries of the packed new tokens (RoPE applied).
        k, v: ``[T, kv_heads, head_dim]`` their keys and values.
        softmax: The decode rows' scaled, masked softmax (``fused.decode_softmax`` or its
            compiled form).
    """
    cache.write(layer, k, v, inputs.slot_mapping)
    if inputs.kernel is not None:
        return kernel_attention(q, cache, layer, inputs, scale)
    decode = inputs.decode
    if decode is not None and decode.rows is None:
        return _decode(q, k, v, cache, layer, decode, scale, softmax)
    num_tokens, heads, head_dim = q.shape
    out = q.new_empty(num_tokens, heads * head_dim)
    if decode is not None and decode.rows is not None:
        rows = decode.rows
        out[rows] = _decode(q[rows], k[rows], v[rows], cache, layer, decode, scale, softmax)
    for fresh in inputs.fresh:
        out[fresh.rows] = _fresh(q[fresh.rows], k[fresh.rows], v[fresh.rows], fresh, scale)
    for chunk in inputs.continued:
        end = chunk.row_start + chunk.length
        out[chunk.row_start : end] = _continued(
            q[chunk.row_start : end], cache, layer, chunk, scale
        )
    return out


def kernel_attention(
    q: torch.Tensor, cache: PagedKVCache, layer: int, inputs: StepInputs, scale: float
) -> torch.Tensor:
    """Every row of the step straight from the cache through the C kernel (``cpu_kernels.py``;
    the runner set ``inputs.kernel``); this step's keys and values must be written already."""
    kernel, tables, contexts = inputs.kernel, inputs.row_tables, inputs.row_contexts
    assert kernel is not None and tables is not None and contexts is not None
    return kernel.attention(q, cache.layer(layer), tables, contexts, inputs.max_context, scale)


def _decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    group: DecodeGroup,
    scale: float,
    softmax: Softmax,
) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    keys, values = _decode_keys_values(k, v, cache, layer, group)  # [kv, B, L, d]
    kv_heads = keys.shape[0]
    queries = q.view(batch, kv_heads, heads // kv_heads, head_dim).transpose(0, 1)
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # [kv, B, group, L]
    bias = group.bias if group.view is None else group.view.bias
    probs = softmax(scores, bias, scale)
    out = torch.matmul(probs, values)  # [kv, B, group, d]
    return out.transpose(0, 1).reshape(batch, heads * head_dim)


def _decode_keys_values(
    k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layer: int, group: DecodeGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = group.view
    if plan is None:
        if group.gather_rows is None:  # the first layer of the step computes them for all
            group.gather_rows = cache.gather_rows(group.block_table)
        return cache.gather(layer, group.gather_rows, k.shape[0])
    view = plan.storage[layer]  # [2, kv, B, capacity, d]
    if plan.rebuild_rows is not None:
        cache.gather_into(layer, plan.rebuild_rows, view)
    else:
        flat = view.view(2, view.shape[1], -1, view.shape[-1])
        flat[0].index_copy_(1, plan.append_index, k.transpose(0, 1))
        flat[1].index_copy_(1, plan.append_index, v.transpose(0, 1))
    return view[0], view[1]


def _fresh(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: FreshPrefill, scale: float
) -> torch.Tensor:
    seqs, length = group.num_seqs, group.length
    heads, head_dim = q.shape[1], q.shape[2]
    queries = q.view(seqs, length, heads, head_dim).transpose(1, 2)
    keys = k.reshape(seqs, length, k.shape[1], head_dim).transpose(1, 2)
    values = v.reshape(seqs, length, v.shape[1], head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries, keys, values, is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(seqs * length, heads * head_dim)


def _continued(
    q: torch.Tensor, cache: PagedKVCache, layer: int, chunk: ContinuedPrefill, scale: float
) -> torch.Tensor:
    length, heads, head_dim = q.shape
    keys, values = cache.gather_one(layer, chunk.blocks)  # [kv, n * bs, d]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.unsqueeze(0),
        values.unsqueeze(0),
        attn_mask=chunk.mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(length, heads * head_dim)
