"""Drive a PagedModelRunner the way the engine will: a minimal step loop with block allocation."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from runtimes_helpers import make_spec

from lmaas.runtimes.llm.batch import Sampled, SamplingConfig, SeqSlot, StepBatch
from lmaas.runtimes.llm.paged import PagedModelRunner
from lmaas.runtimes.llm.paged.kv_cache import bytes_per_block

GREEDY = SamplingConfig(temperature=0.0)


class GreedySampler:
    """Argmax per row; records what the runner freed (the real Sampler is another module)."""

    def __init__(self) -> None:
        self.freed: list[int] = []

    def sample(self, logits: torch.Tensor, slots: Sequence[SeqSlot]) -> list[Sampled]:
        assert logits.dtype == torch.float32 and logits.shape[0] == len(slots)
        return [Sampled(token_id=int(t)) for t in logits.argmax(dim=-1).tolist()]

    def free(self, seq_ids: Iterable[int]) -> None:
        self.freed.extend(seq_ids)


def load_runner(
    model_dir: Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    num_blocks: int = 64,
    block_size: int = 8,
    decode_view_bytes: int = 1 << 30,
    options: dict[str, str] | None = None,
) -> tuple[PagedModelRunner, GreedySampler]:
    sampler = GreedySampler()
    spec = make_spec(model_dir, dtype=dtype, device=device, options=options or {})
    runner = PagedModelRunner(spec, sampler=sampler, decode_view_bytes=decode_view_bytes)
    runner.load()
    config = runner.config
    block_bytes = bytes_per_block(
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        block_size=block_size,
        dtype=runner.dtype,
    )
    # The budget covers the blocks and the decode view (none with the C kernels).
    view_bytes = 0 if runner.cpu_kernels else decode_view_bytes
    layout = runner.allocate_kv_cache(num_blocks * block_bytes + view_bytes, block_size)
    assert layout.num_blocks == num_blocks
    assert layout.extra_bytes == view_bytes
    return runner, sampler


@dataclass
class _Seq:
    seq_id: int
    tokens: list[int]
    num_prompt: int
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)


class BlockPool:
    """Free physical blocks, optionally handed out in a shuffled (non-contiguous) order."""

    def __init__(self, num_blocks: int, *, shuffle: bool) -> None:
        self.free = list(range(num_blocks))
        if shuffle:
            random.Random(0).shuffle(self.free)

    def cover(self, blocks: list[int], num_tokens: int, block_size: int) -> None:
        while len(blocks) * block_size < num_tokens:
            blocks.append(self.free.pop())


def generate_greedy(
    runner: PagedModelRunner,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    chunk_size: int | None = None,
    shuffle_blocks: bool = False,
    block_size: int = 8,
    num_blocks: int = 64,
) -> list[list[int]]:
    """Greedy-decode every prompt together; prefill in chunks of ``chunk_size`` tokens."""
    pool = BlockPool(num_blocks, shuffle=shuffle_blocks)
    seqs = [_Seq(i, list(p), len(p)) for i, p in enumerate(prompts)]
    running, done, freed = list(seqs), list[_Seq](), list[int]()
    while running:
        slots = []
        for seq in running:
            end = len(seq.tokens) if chunk_size is None else seq.num_computed + chunk_size
            chunk = seq.tokens[seq.num_computed : end]
            pool.cover(seq.blocks, seq.num_computed + len(chunk), block_size)
            sample = seq.num_computed + len(chunk) == len(seq.tokens)
            slots.append(
                SeqSlot(seq.seq_id, chunk, seq.num_computed, list(seq.blocks), sample, GREEDY)
            )
        results = iter(runner.execute(StepBatch(slots, freed_seq_ids=freed)))
        freed = []
        for seq, slot in zip(running, slots, strict=True):
            seq.num_computed += len(slot.token_ids)
            if slot.sample:
                seq.tokens.append(next(results).token_id)
            if len(seq.tokens) - seq.num_prompt == max_new_tokens:
                done.append(seq)
                pool.free.extend(seq.blocks)
                freed.append(seq.seq_id)
        running = [s for s in running if s not in done]
    runner.execute(StepBatch([], freed_seq_ids=freed))
    return [s.tokens[s.num_prompt :] for s in seqs]


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab_size) for _ in range(n)] for n in lengths]
