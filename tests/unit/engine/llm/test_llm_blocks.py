"""BlockManager: allocation, reference counts, prefix cache (namespaces, LRU), fork."""

from __future__ import annotations

import pytest

from lmaas.core.errors import InternalError
from lmaas.engine.llm.blocks import BlockManager


def _compute(
    manager: BlockManager, tokens: list[int], namespace: str = ""
) -> tuple[list[int], list[int]]:
    """Allocate a table for ``tokens`` as if computed, registering its full blocks."""
    hashes: list[int] = []
    table = manager.allocate(manager.num_blocks_for(len(tokens)))
    manager.cache_full_blocks(
        tokens, table, hashes, namespace, 0, len(tokens) // manager.block_size
    )
    return table, hashes


def test_rejects_empty_caches() -> None:
    with pytest.raises(ValueError, match=r"num_blocks \(0\)"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match=r"block_size \(0\)"):
        BlockManager(4, 0)


def test_allocate_and_free_keep_the_count() -> None:
    manager = BlockManager(8, 4)
    assert (manager.num_blocks, manager.block_size, manager.enable_prefix_caching) == (8, 4, True)
    table = manager.allocate(3)
    assert table == [0, 1, 2]
    assert manager.num_free_blocks == 5 and manager.can_allocate(5) and not manager.can_allocate(6)
    assert all(manager.ref_count(b) == 1 for b in table)
    manager.free(table)
    assert manager.num_free_blocks == 8
    with pytest.raises(InternalError, match="asked for 9 KV blocks with 8 free"):
        manager.allocate(9)


def test_double_free_is_caught() -> None:
    manager = BlockManager(2, 4)
    table = manager.allocate(1)
    manager.free(table)
    with pytest.raises(AssertionError, match="freed twice"):
        manager.free(table)


def test_num_blocks_for_rounds_up() -> None:
    manager = BlockManager(2, 4)
    assert [manager.num_blocks_for(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token() -> None:
    manager = BlockManager(16, 4)
    prompt = list(range(12))
    table, _ = _compute(manager, prompt)
    assert manager.num_cached_blocks == 3 and all(manager.is_cached(b) for b in table)
    manager.free(table)
    assert manager.num_free_blocks == 16
    # Same 12 tokens: only 2 blocks, so that the last token is computed and yields logits.
    blocks, num_cached = manager.match_prefix(prompt, "")
    assert (blocks, num_cached) == (table[:2], 8)
    assert manager.num_free_blocks == 14
    # A longer prompt with the same start gets all three.
    blocks3, num_cached3 = manager.match_prefix([*prompt, 99], "")
    assert (blocks3, num_cached3) == (table, 12)
    assert manager.ref_count(table[0]) == 2 and manager.ref_count(table[2]) == 1


def test_prefix_miss_across_namespaces_and_diverging_tokens() -> None:
    manager = BlockManager(16, 4)
    prompt = list(range(9))
    _compute(manager, prompt, namespace="tenant-a")
    assert manager.match_prefix(prompt, "tenant-b") == ([], 0)
    diverged = [0, 1, 2, 3, 40, 5, 6, 7, 8]
    blocks, num_cached = manager.match_prefix(diverged, "tenant-a")
    assert num_cached == 4 and len(blocks) == 1
    # A block's key includes its parent: the same tokens after another prefix do not match.
    shifted = [9, 9, 9, 9, 4, 5, 6, 7, 8]
    assert manager.match_prefix(shifted, "tenant-a") == ([], 0)


def test_lookup_extends_the_hash_chain_once() -> None:
    manager = BlockManager(16, 4)
    prompt = list(range(9))
    _, hashes = _compute(manager, prompt)
    chain: list[int] = []
    assert len(manager.lookup_prefix(prompt, "", chain)) == 2
    assert chain == hashes
    assert manager.lookup_prefix(prompt, "", chain) and chain == hashes
    assert manager.num_evictable(manager.lookup_prefix(prompt, "", chain)) == 0


def test_unreferenced_cached_blocks_are_evicted_lru_after_fresh_ones() -> None:
    manager = BlockManager(4, 2)
    old, _ = _compute(manager, [1, 2, 3, 4])
    manager.free(old)
    new, _ = _compute(manager, [5, 6])
    manager.free(new)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 3
    # One never-cached block is left: it goes first, then the least recently freed cached.
    assert manager.allocate(1) == [3]
    assert manager.num_cached_blocks == 3
    second = manager.allocate(1)
    # The older sequence's blocks were freed last-block-first: its tail goes before its head.
    assert second == [old[1]] and manager.num_cached_blocks == 2
    assert not manager.is_cached(old[1])
    assert manager.match_prefix([1, 2, 3, 4, 0], "") == ([old[0]], 2)
    manager.free(second)
    assert manager.match_prefix([5, 6, 0], "") == (new, 2)


def test_a_duplicate_full_block_stays_private() -> None:
    manager = BlockManager(8, 2)
    first, _ = _compute(manager, [7, 7])
    second, _ = _compute(manager, [7, 7])
    assert manager.is_cached(first[0]) and not manager.is_cached(second[0])
    manager.free(second)
    manager.free(first)
    assert manager.num_cached_blocks == 1 and manager.num_free_blocks == 8


def test_disabled_prefix_caching_caches_nothing() -> None:
    manager = BlockManager(8, 2, enable_prefix_caching=False)
    table, hashes = _compute(manager, [1, 2, 3, 4])
    assert hashes == [] and manager.num_cached_blocks == 0
    manager.free(table)
    assert manager.match_prefix([1, 2, 3, 4, 5], "") == ([], 0)


def test_fork_shares_full_blocks_and_copies_a_partial_last_block() -> None:
    manager = BlockManager(8, 4)
    parent = manager.allocate(3)
    child, copies = manager.fork(parent, 10)
    assert child[:2] == parent[:2] and child[2] not in parent
    assert copies == [(parent[2], child[2])]
    assert [manager.ref_count(b) for b in parent] == [2, 2, 1]
    full_child, no_copies = manager.fork(parent[:2], 8)
    assert full_child == parent[:2] and no_copies == []
    assert manager.fork([], 0) == ([], [])
    for table in (parent, child, full_child):
        manager.free(table)
    assert manager.num_free_blocks == 8


def test_fork_without_a_free_block_fails_loudly() -> None:
    manager = BlockManager(1, 4)
    parent = manager.allocate(1)
    with pytest.raises(InternalError):
        manager.fork(parent, 3)
