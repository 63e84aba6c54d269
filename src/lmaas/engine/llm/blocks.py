"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts and a prefix cache.

Plain Python over block ids; the model runner owns the memory. A sequence's *block table* lists
the blocks that hold its positions in order (position ``p`` lives in ``table[p // block_size]``).

Prefix caching: once a block is FULL and computed, it is keyed by its tokens, the tenant
namespace and the hash of the block before it (a chain, so a key names the whole prefix). A new
sequence whose prompt starts with the same blocks reuses them instead of recomputing. Freed
blocks that carry a key stay cached (reference count 0, "evictable") and are evicted least
recently used first, only when a fresh block is needed and no never-cached block is left.

Keys compare exactly (tokens and namespace); only the parent link is a 64-bit hash, seeded with
a per-manager random salt so that nobody outside the process can craft colliding prompts.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Sequence

from lmaas.core.errors import InternalError

_BlockKey = tuple[int, str, tuple[int, ...]]
"""(hash of the parent block's key, namespace, this block's token ids)."""


class BlockManager:
    """Allocates KV blocks and shares full ones between sequences.

    Args:
        num_blocks: Blocks in the cache (the runner's ``KVCacheLayout.num_blocks``).
        block_size: Tokens per block.
        enable_prefix_caching: Keep and reuse full blocks keyed by content and namespace.

    Raises:
        ValueError: ``num_blocks`` or ``block_size`` below 1.
    """

    __slots__ = (
        "_block_size",
        "_cached",
        "_evictable",
        "_free",
        "_keys",
        "_num_blocks",
        "_prefix_caching",
        "_ref_counts",
        "_root_hash",
    )

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks ({num_blocks}) and block_size ({block_size}) must be at least 1"
            )
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._keys: list[_BlockKey | None] = [None] * num_blocks
        # Never-cached free blocks, popped from the end: block 0 is handed out first.
        self._free = list(range(num_blocks - 1, -1, -1))
        # Cached blocks nobody references, oldest use first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[_BlockKey, int] = {}
        self._root_hash = secrets.randbits(62)

    # ------------------------------------------------------------------ sizes

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._cached)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` positions."""
        return -(-num_tokens // self._block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        return self._keys[block] is not None

    # ------------------------------------------------------------------ allocation

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free) + len(self._evictable)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` fresh blocks (reference count 1), evicting cached ones LRU.

        Raises:
            InternalError: Fewer free blocks than asked (callers check :meth:`can_allocate`).
        """
        if not self.can_allocate(num_blocks):
            raise InternalError(
                f"asked for {num_blocks} KV blocks with {self.num_free_blocks} free"
            )
        blocks: list[int] = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                key = self._keys[block]
                assert key is not None
                del self._cached[key]
                self._keys[block] = None
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_table: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced cached blocks become evictable.

        The table is walked backwards so that a sequence's last blocks are evicted before its
        first ones: a prefix is only useful while every block before it is still cached.
        """
        ref_counts = self._ref_counts
        for block in reversed(block_table):
            ref_counts[block] -= 1
            assert ref_counts[block] >= 0, f"block {block} freed twice"
            if ref_counts[block] == 0:
                if self._keys[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def fork(
        self, block_table: list[int], num_tokens: int
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """A copy of a table holding ``num_tokens`` positions, for a sibling sequence (``n > 1``).

        Full blocks are shared (reference count + 1). A partly filled last block would be
        written by both owners, so the child gets a fresh block and the runner must copy the
        parent's into it first: the returned ``(src, dst)`` pairs (``StepBatch.block_copies``).

        Raises:
            InternalError: The partial block needs a fresh one and none is free.
        """
        assert len(block_table) == self.num_blocks_for(num_tokens)
        partial = num_tokens % self._block_size != 0
        shared = block_table[:-1] if partial else block_table
        for block in shared:
            self._ref_counts[block] += 1
        child = list(shared)
        copies: list[tuple[int, int]] = []
        if partial:
            (dst,) = self.allocate(1)
            copies.append((block_table[-1], dst))
            child.append(dst)
        return child, copies

    # ------------------------------------------------------------------ prefix cache

    def lookup_prefix(
        self, token_ids: Sequence[int], namespace: str, block_hashes: list[int]
    ) -> list[int]:
        """The cached blocks that hold the longest full-block prefix of ``token_ids``.

        At least one token is always left uncached, so that computing the rest yields logits
        to sample from. Nothing is referenced: pass the result to :meth:`acquire`.

        Args:
            token_ids: The sequence's known tokens (prompt, plus outputs after a preemption).
            namespace: The tenant; blocks never match across namespaces.
            block_hashes: The sequence's chain hashes, one per full block; extended in place
                so that later calls and :meth:`cache_full_blocks` do not hash again.
        """
        if not self._prefix_caching:
            return []
        blocks: list[int] = []
        for index in range((len(token_ids) - 1) // self._block_size):
            key = self._key(token_ids, index, namespace, block_hashes)
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_evictable(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` nobody references (acquiring them uses up free blocks)."""
        ref_counts = self._ref_counts
        return sum(1 for block in blocks if ref_counts[block] == 0)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Reference cached blocks found by :meth:`lookup_prefix`."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1

    def match_prefix(
        self, token_ids: Sequence[int], namespace: str, block_hashes: list[int] | None = None
    ) -> tuple[list[int], int]:
        """:meth:`lookup_prefix` then :meth:`acquire`: the reused blocks and tokens they hold."""
        blocks = self.lookup_prefix(
            token_ids, namespace, [] if block_hashes is None else block_hashes
        )
        self.acquire(blocks)
        return blocks, len(blocks) * self._block_size

    def cache_full_blocks(
        self,
        token_ids: Sequence[int],
        block_table: Sequence[int],
        block_hashes: list[int],
        namespace: str,
        first_block: int,
        end_block: int,
    ) -> None:
        """Register the now full and computed blocks ``[first_block, end_block)`` of a table.

        A block whose key is cached already (another sequence computed the same content at the
        same time) stays private and is freed normally.
        """
        if not self._prefix_caching:
            return
        for index in range(first_block, end_block):
            key = self._key(token_ids, index, namespace, block_hashes)
            block = block_table[index]
            if key not in self._cached and self._keys[block] is None:
                self._cached[key] = block
                self._keys[block] = key

    def _key(
        self, token_ids: Sequence[int], index: int, namespace: str, block_hashes: list[int]
    ) -> _BlockKey:
        size = self._block_size
        parent = block_hashes[index - 1] if index else self._root_hash
        key = (parent, namespace, tuple(token_ids[index * size : (index + 1) * size]))
        assert index <= len(block_hashes), "block hashes are computed in order"
        if index == len(block_hashes):
            block_hashes.append(hash(key))
        return key
