"""Step index tensors: positions, slot mapping over scattered blocks, attention groups."""

from __future__ import annotations

import pytest
import torch
from paged_helpers import GREEDY

from lmaas.core.errors import InternalError
from lmaas.runtimes.llm.batch import SeqSlot
from lmaas.runtimes.llm.paged.decode_view import HEADROOM_BLOCKS, DecodeView
from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.step import DecodeGroup, build_step_inputs

CPU = torch.device("cpu")


def test_mixed_step_packs_tokens_and_maps_slots() -> None:
    slots = [
        SeqSlot(0, [11], 9, [7, 2], True, GREEDY),  # decode at position 9 → block 2, offset 1
        SeqSlot(1, [1, 2, 3], 0, [5], False, GREEDY),  # fresh prefill chunk
        SeqSlot(2, [4, 5, 6], 6, [3, 0], True, GREEDY),  # continued chunk crossing a block
        SeqSlot(3, [7, 8, 9], 0, [1], True, GREEDY),  # same length as seq 1: stacked with it
    ]
    inputs = build_step_inputs(slots, block_size=8, device=CPU)
    assert inputs.token_ids.tolist() == [11, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert inputs.positions.tolist() == [9, 0, 1, 2, 6, 7, 8, 0, 1, 2]
    assert inputs.slot_mapping.tolist() == [17, 40, 41, 42, 30, 31, 0, 8, 9, 10]
    assert inputs.sample_rows.tolist() == [0, 6, 9]
    # Only those rows need the last layer's projections and MLP.
    assert inputs.last_layer_rows is not None and inputs.last_layer_rows.tolist() == [0, 6, 9]
    decode = inputs.decode
    assert decode is not None and decode.rows is not None
    assert decode.rows.tolist() == [0]
    assert decode.block_table.tolist() == [[7, 2]]
    assert torch.isinf(decode.bias[0, 0]).tolist() == [False] * 10 + [True] * 6
    assert len(inputs.fresh) == 1
    assert inputs.fresh[0].rows.tolist() == [1, 2, 3, 7, 8, 9]
    (chunk,) = inputs.continued
    assert (chunk.row_start, chunk.length, chunk.context_length) == (4, 3, 9)
    assert chunk.blocks.tolist() == [3, 0]
    assert chunk.mask[0].tolist() == [True] * 7 + [False] * 9
    assert chunk.mask[2].tolist() == [True] * 9 + [False] * 7


def test_decode_only_step_needs_no_row_indices() -> None:
    slots = [
        SeqSlot(i, [i], pos, [i, 10 + i, 20 + i], True, GREEDY) for i, pos in enumerate((3, 17))
    ]
    inputs = build_step_inputs(slots, block_size=8, device=CPU)
    assert inputs.decode is not None and inputs.decode.rows is None
    # Padded to the longest context (3 blocks); the shorter one only needs its first block.
    assert inputs.decode.block_table.tolist() == [[0, 10, 20], [1, 11, 21]]
    assert inputs.slot_mapping.tolist() == [3, 169]
    assert not inputs.fresh and not inputs.continued
    assert inputs.last_layer_rows is None  # every row is sampled: nothing to prune


def test_block_table_too_short_is_a_bug() -> None:
    with pytest.raises(InternalError, match="sequence 4"):
        build_step_inputs([SeqSlot(4, [1, 2], 7, [0], True, GREEDY)], block_size=8, device=CPU)


def test_cache_write_gather_and_copy_round_trip() -> None:
    cache = PagedKVCache(
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        num_blocks=6,
        block_size=4,
        dtype=torch.float32,
        device=CPU,
    )
    keys = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    cache.write(1, keys, -keys, torch.tensor([21, 22, 5]))  # block 5 slots 1-2, block 1 slot 1
    rows = cache.gather_rows(torch.tensor([[5, 1], [1, 5]]))
    got_k, got_v = (t.clone() for t in cache.gather(1, rows, 2))
    assert got_k.shape == (2, 2, 8, 4)
    torch.testing.assert_close(got_k[:, 0, 1], keys[0])
    torch.testing.assert_close(got_v[:, 0, 5], -keys[2])
    torch.testing.assert_close(got_k[:, 1, 6], keys[1])
    torch.testing.assert_close(got_k[:, 1, 1], keys[2])
    assert cache.gather(0, rows, 2)[0].abs().sum() == 0
    cache.copy_blocks([(5, 0), (1, 3)])
    torch.testing.assert_close(cache.gather_one(1, torch.tensor([0, 3]))[0], got_k[:, 0])


def _group(seq_ids: list[int], contexts: list[int], block_size: int = 4) -> DecodeGroup:
    slots = [
        SeqSlot(s, [1], c - 1, [s, 8 + s, 16 + s], True, GREEDY)
        for s, c in zip(seq_ids, contexts, strict=True)
    ]
    group = build_step_inputs(slots, block_size=block_size, device=CPU).decode
    assert group is not None
    return group


def test_decode_view_appends_while_the_batch_only_advances() -> None:
    cache = PagedKVCache(
        num_layers=1,
        num_kv_heads=1,
        head_dim=2,
        num_blocks=24,
        block_size=4,
        dtype=torch.float32,
        device=CPU,
    )
    view = DecodeView(cache)
    first = view.plan(_group([0, 1], [5, 3]), [], copied=False)
    assert first is not None and first.rebuild_rows is not None
    capacity = first.storage.shape[4]
    assert capacity == (2 + HEADROOM_BLOCKS) * 4
    step = view.plan(_group([0, 1], [6, 4]), [], copied=False)
    assert step is not None and step.rebuild_rows is None
    assert step.append_index.tolist() == [5, capacity + 3]
    # Anything else rebuilds: a new member, a block copy, a freed member, a repeated position.
    for group, freed, copied in (
        (_group([0, 1, 2], [7, 5, 2]), [], False),
        (_group([0, 1, 2], [8, 6, 3]), [], True),
        (_group([0, 1, 2], [9, 7, 4]), [1], False),
        (_group([0, 1, 2], [9, 7, 4]), [], False),
    ):
        plan = view.plan(group, freed, copied)
        assert plan is not None and plan.rebuild_rows is not None


def test_decode_view_stays_within_its_memory_bound() -> None:
    cache = PagedKVCache(
        num_layers=1,
        num_kv_heads=1,
        head_dim=2,
        num_blocks=24,
        block_size=4,
        dtype=torch.float32,
        device=CPU,
    )
    per_block = 2 * 4 * 2 * 4  # K and V, 4 positions, head_dim 2, float32, one sequence
    assert DecodeView(cache, max_bytes=per_block * 2 - 1).plan(_group([0], [5]), [], False) is None
    plan = DecodeView(cache, max_bytes=per_block * 3).plan(_group([0], [5]), [], False)
    assert plan is not None and plan.storage.shape[4] == 3 * 4
