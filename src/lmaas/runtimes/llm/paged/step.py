"""Index tensors for one step, built once for the whole batch and shared by every layer.

All slots' new tokens are packed into one ``[num_tokens]`` row space (no padding). Attention
then treats two kinds of slots differently:

* decode slots (one new token) run together as one padded batch over their gathered blocks;
* prefill chunks (several tokens) run per group: fresh prompts of equal length (``start_pos``
  0) are stacked and attend to their own new keys; continued chunks attend to their cached
  context, gathered from their blocks, with the causal mask offset by ``start_pos``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from lmaas.core.errors import InternalError
from lmaas.runtimes.llm.batch import SeqSlot
from lmaas.runtimes.llm.paged.cpu_kernels import CpuKernels


@dataclass(slots=True)
class ViewPlan:
    """How this step's decode attention uses the decode view (``decode_view.DecodeView``)."""

    storage: torch.Tensor
    """``[layers, 2, kv_heads, B, capacity, head_dim]``."""
    rebuild_rows: torch.Tensor | None
    """Cache rows to gather into each layer's view (a rebuild); None: append only."""
    append_index: torch.Tensor
    """``[B]`` flat ``b * capacity + position`` of each sequence's new token."""
    bias: torch.Tensor
    """``[B, 1, capacity]`` float32 mask: attention runs over the whole (contiguous) capacity,
    since a sliced operand makes every bmm copy it first (measured 3x slower)."""


@dataclass(slots=True)
class DecodeGroup:
    """Slots with one new token: one batched attention over padded, gathered blocks."""

    seq_ids: list[int]
    contexts: list[int]
    """Positions each sequence attends to (``start_pos + 1``)."""
    rows: torch.Tensor | None
    """Their rows in the packed tokens; None when every row of the step is a decode row."""
    block_table: torch.Tensor
    """``[B, max_blocks]`` physical blocks (padded with block 0, masked)."""
    gather_rows: torch.Tensor | None
    """Cache rows of those blocks for every K/V head (``PagedKVCache.gather_rows``)."""
    bias: torch.Tensor
    """``[B, 1, max_blocks * block_size]`` float32: 0 for real positions, -inf for padding."""
    view: ViewPlan | None = None
    """Set by the runner when the decode view serves this step's keys and values."""


@dataclass(slots=True)
class FreshPrefill:
    """Prompts starting at position 0 with the same chunk length: attend to their own keys."""

    rows: torch.Tensor
    """``[P * T]`` rows in the packed tokens, sequence by sequence."""
    num_seqs: int
    length: int


@dataclass(slots=True)
class ContinuedPrefill:
    """A chunk after earlier chunks: attends to cached context plus itself."""

    row_start: int
    length: int
    context_length: int
    blocks: torch.Tensor
    """``[n]`` physical blocks covering ``context_length`` positions."""
    mask: torch.Tensor
    """``[T, n * block_size]`` bool, True where a query may attend."""


@dataclass(slots=True)
class StepInputs:
    token_ids: torch.Tensor
    """``[T]`` packed new tokens of every slot."""
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    """``[T]`` flat cache slots (``block * block_size + offset``) the new K/V go to."""
    sample_rows: torch.Tensor
    """Rows whose logits are sampled, in slot order."""
    last_layer_rows: torch.Tensor | None = None
    """``sample_rows`` when they are not every row: after its attention, the last layer runs
    its output projection and MLP for these rows alone (prompt tokens other than a prompt's
    last need only their keys and values, i.e. every layer up to the last one's attention).
    None when every row is sampled."""
    row_tables: torch.Tensor | None = None
    """``[T, max_blocks]`` each row's sequence's blocks, and ``row_contexts`` ``[T]`` the
    positions each row attends to (its position + 1), ``max_context`` their maximum: the
    operands of the C attention kernel, which treats every row alike (``cpu_kernels.py``)."""
    row_contexts: torch.Tensor | None = None
    max_context: int = 0
    kernel: CpuKernels | None = None
    """Set by the runner when the C kernel attends for every row (no groups, no decode view)."""
    decode: DecodeGroup | None = None
    fresh: list[FreshPrefill] = field(default_factory=list)
    continued: list[ContinuedPrefill] = field(default_factory=list)


def build_step_inputs(
    slots: Sequence[SeqSlot],
    block_size: int,
    device: torch.device,
    *,
    kernel: CpuKernels | None = None,
) -> StepInputs:
    """Index tensors for ``slots`` (at least one slot, each with at least one token).

    With ``kernel`` (the C attention kernel, CPU only) every row attends through it: the
    per-row tables and contexts replace the attention groups."""
    lengths = [len(slot.token_ids) for slot in slots]
    starts = [slot.start_pos for slot in slots]
    ends = [start + n for start, n in zip(starts, lengths, strict=True)]
    max_blocks = max(-(-end // block_size) for end in ends)
    for slot, end in zip(slots, ends, strict=True):
        if len(slot.block_table) * block_size < end:
            raise InternalError(
                f"sequence {slot.seq_id}: {len(slot.block_table)} blocks of {block_size} "
                f"cannot hold positions up to {end}"
            )
    table = torch.tensor(
        [_padded(slot.block_table, max_blocks) for slot in slots], dtype=torch.long
    )
    offsets = list(_cumulative(lengths))
    if all(n == 1 for n in lengths):
        positions = torch.tensor(starts, dtype=torch.long)
        seq_index = torch.arange(len(slots))
    else:
        seq_index = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(lengths))
        first_row = torch.tensor(offsets[:-1], dtype=torch.long)[seq_index]
        row = torch.arange(offsets[-1], dtype=torch.long)
        positions = torch.tensor(starts, dtype=torch.long)[seq_index] + (row - first_row)
    slot_mapping = table[seq_index, positions // block_size] * block_size + positions % block_size
    sample_rows = [offsets[i + 1] - 1 for i, slot in enumerate(slots) if slot.sample]
    sampled = torch.tensor(sample_rows, dtype=torch.long)
    inputs = StepInputs(
        token_ids=torch.tensor(list(chain.from_iterable(s.token_ids for s in slots))),
        positions=positions,
        slot_mapping=slot_mapping,
        sample_rows=sampled,
        last_layer_rows=None if len(sample_rows) == offsets[-1] else sampled,
    )
    if kernel is not None:
        inputs.kernel = kernel
        inputs.row_tables = table[seq_index] if len(slots) < offsets[-1] else table
        inputs.row_contexts = positions + 1
        inputs.max_context = max(ends)
        return inputs
    seq_ids = [slot.seq_id for slot in slots]
    _add_attention_groups(inputs, seq_ids, lengths, starts, offsets, table, block_size)
    return _to_device(inputs, device)


def _add_attention_groups(
    inputs: StepInputs,
    seq_ids: list[int],
    lengths: list[int],
    starts: list[int],
    offsets: list[int],
    table: torch.Tensor,
    block_size: int,
) -> None:
    decode = [i for i, n in enumerate(lengths) if n == 1]
    if decode:
        every_row = len(decode) == len(lengths)
        rows = None if every_row else torch.tensor([offsets[i] for i in decode])
        contexts = [starts[i] + 1 for i in decode]
        decode_table = table if every_row else table[decode]
        inputs.decode = _decode_group(rows, decode_table, contexts, block_size)
        inputs.decode.seq_ids = [seq_ids[i] for i in decode]
    fresh: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n > 1 and starts[i] == 0:
            fresh.setdefault(n, []).append(i)
        elif n > 1:
            inputs.continued.append(_continued(offsets[i], n, starts[i], table[i], block_size))
    for n, members in fresh.items():
        rows = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in members])
        inputs.fresh.append(FreshPrefill(rows=rows, num_seqs=len(members), length=n))


def _decode_group(
    rows: torch.Tensor | None, table: torch.Tensor, contexts: list[int], block_size: int
) -> DecodeGroup:
    max_blocks = -(-max(contexts) // block_size)
    table = table[:, :max_blocks].contiguous()
    key_pos = torch.arange(max_blocks * block_size)
    bias = torch.zeros(len(contexts), 1, max_blocks * block_size, dtype=torch.float32)
    padding = key_pos[None, :] >= torch.tensor(contexts)[:, None]
    bias.masked_fill_(padding.unsqueeze(1), float("-inf"))
    return DecodeGroup(
        seq_ids=[],
        contexts=contexts,
        rows=rows,
        block_table=table,
        gather_rows=None,
        bias=bias,
    )


def _continued(
    row_start: int, length: int, start: int, table_row: torch.Tensor, block_size: int
) -> ContinuedPrefill:
    context = start + length
    num_blocks = -(-context // block_size)
    key_pos = torch.arange(num_blocks * block_size)
    query_pos = torch.arange(start, context)
    return ContinuedPrefill(
        row_start=row_start,
        length=length,
        context_length=context,
        blocks=table_row[:num_blocks].contiguous(),
        mask=key_pos[None, :] <= query_pos[:, None],
    )


def _padded(blocks: list[int], width: int) -> list[int]:
    if len(blocks) >= width:
        return blocks[:width]
    return blocks + [0] * (width - len(blocks))


def _cumulative(lengths: list[int]) -> list[int]:
    total, out = 0, [0]
    for n in lengths:
        total += n
        out.append(total)
    return out


def _to_device(inputs: StepInputs, device: torch.device) -> StepInputs:
    if device.type == "cpu":
        return inputs

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    inputs.token_ids, inputs.positions = move(inputs.token_ids), move(inputs.positions)
    inputs.slot_mapping, inputs.sample_rows = move(inputs.slot_mapping), move(inputs.sample_rows)
    if inputs.last_layer_rows is not None:
        inputs.last_layer_rows = inputs.sample_rows
    if inputs.decode is not None:
        group = inputs.decode
        group.block_table, group.bias = move(group.block_table), move(group.bias)
        group.rows = None if group.rows is None else move(group.rows)
    for fresh in inputs.fresh:
        fresh.rows = move(fresh.rows)
    for chunk in inputs.continued:
        chunk.blocks, chunk.mask = move(chunk.blocks), move(chunk.mask)
    return inputs
