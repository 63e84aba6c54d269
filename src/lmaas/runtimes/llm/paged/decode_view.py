"""A contiguous copy of the decode batch's K/V, kept across steps while the batch is unchanged.

Decode attention needs each sequence's keys and values as one ``[kv_heads, B, context, d]``
operand. Gathering them from scattered blocks every layer of every step re-copies the whole
context (on the 125M benchmark at batch 64: ~9 MB per layer, the largest non-matmul cost of a
step). While the decode batch stays the same sequences in the same order, each advancing by one
token, the view from the last step is still right except for the new token: the step then only
appends that token. Any other change (a sequence joins or leaves, a block copy, a sequence
outgrowing the view) rebuilds the view with one gather, i.e. costs what gathering always costs.

The paged cache stays the source of truth; the view is a cache of it, bounded by ``max_bytes``
(beyond that, attention gathers into a per-step workspace instead).
"""

from __future__ import annotations

import math

import torch

from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.step import DecodeGroup, ViewPlan

DEFAULT_VIEW_BYTES = 256 << 20
"""Memory the view may take (the 125M model at batch 64 fits contexts up to ~340 tokens)."""
HEADROOM_BLOCKS = 2
"""Blocks per sequence allocated beyond the current need, so growth rebuilds rarely (every
``HEADROOM_BLOCKS * block_size`` steps at most); attention computes over them, masked."""


class DecodeView:
    """Owns the view storage and decides, each step, whether to append or rebuild."""

    __slots__ = ("_buffer", "_cache", "_contexts", "_max_bytes", "_seq_ids", "_storage")

    def __init__(self, cache: PagedKVCache, max_bytes: int = DEFAULT_VIEW_BYTES) -> None:
        self._cache = cache
        self._max_bytes = max_bytes
        self._buffer: torch.Tensor | None = None
        """Flat memory every storage shape is a view of (allocated once, ``max_bytes``)."""
        self._storage: torch.Tensor | None = None
        self._seq_ids: list[int] = []
        self._contexts: list[int] = []

    def invalidate(self) -> None:
        self._seq_ids, self._contexts = [], []

    def plan(self, group: DecodeGroup, freed_seq_ids: list[int], copied: bool) -> ViewPlan | None:
        """The plan for ``group``; None when the view would exceed its memory bound."""
        if copied or (freed_seq_ids and not set(freed_seq_ids).isdisjoint(self._seq_ids)):
            self.invalidate()
        needed_blocks = int(group.block_table.shape[1])
        reuse = (
            self._storage is not None
            and group.seq_ids == self._seq_ids
            and needed_blocks * self._cache.block_size <= self._storage.shape[4]
            and all(c == p + 1 for c, p in zip(group.contexts, self._contexts, strict=True))
        )
        self._seq_ids, self._contexts = group.seq_ids, group.contexts
        if reuse:
            assert self._storage is not None  # checked in reuse
            return _plan(group, self._storage, None)
        storage = self._allocate(len(group.seq_ids), needed_blocks)
        if storage is None:
            self.invalidate()
            return None
        capacity_blocks = storage.shape[4] // self._cache.block_size
        table = torch.zeros(
            len(group.seq_ids), capacity_blocks, dtype=torch.long, device=storage.device
        )
        table[:, :needed_blocks] = group.block_table
        return _plan(group, storage, self._cache.gather_rows(table))

    def _allocate(self, batch: int, needed_blocks: int) -> torch.Tensor | None:
        storage = self._cache.storage
        layers, two, heads, _, size, head_dim = storage.shape
        per_block = layers * two * heads * batch * size * head_dim * storage.element_size()
        affordable = self._max_bytes // per_block
        if affordable < needed_blocks:
            return None
        blocks = min(needed_blocks + HEADROOM_BLOCKS, affordable)
        shape = (layers, two, heads, batch, blocks * size, head_dim)
        if self._storage is None or self._storage.shape != shape:
            # A new shape reuses the same memory: a fresh tensor per batch change would fault
            # in (and the OS zero) hundreds of MB of pages during the rebuild's gather.
            if self._buffer is None:
                numel = self._max_bytes // storage.element_size()
                self._buffer = torch.empty(numel, dtype=storage.dtype, device=storage.device)
            self._storage = self._buffer[: math.prod(shape)].view(shape)
        return self._storage


def _plan(group: DecodeGroup, storage: torch.Tensor, rebuild_rows: torch.Tensor | None) -> ViewPlan:
    capacity = storage.shape[4]
    contexts = torch.tensor(group.contexts, dtype=torch.long)
    index = torch.arange(len(group.contexts), dtype=torch.long) * capacity + contexts - 1
    bias = torch.zeros(len(group.contexts), 1, capacity, dtype=torch.float32)
    padding = torch.arange(capacity)[None, :] >= contexts[:, None]
    bias.masked_fill_(padding.unsqueeze(1), float("-inf"))
    device = storage.device
    return ViewPlan(storage, rebuild_rows, index.to(device), bias.to(device))
