"""Deterministic fakes of the LLM engine's torch side (no torch): a model runner that checks the
step contract on every call, and a whitespace prompt processor.

:class:`FakeModelRunner` simulates the paged KV cache itself: each cache slot holds the token
id computed at that position. Before a sequence's tokens are "computed" the runner reads its
earlier positions back through the block table and checks them against the history, so a wrong
prefix-cache hit, a missing copy-on-write or a block handed to two writers fails the step.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import GenerateRequest, ModelInfo
from lmaas.runtimes.llm.batch import KVCacheLayout, Sampled, SeqSlot, StepBatch

NextTokenFn = Callable[[Sequence[int], SeqSlot], int]
"""Chooses the next token from the context read back from the cache (and the slot)."""

_BYTES_PER_TOKEN = 64


class StepContractError(AssertionError):
    """A StepBatch broke the scheduler ↔ runner contract."""


@dataclass(slots=True, frozen=True)
class SlotRecord:
    seq_id: int
    start_pos: int
    num_tokens: int
    sample: bool
    block_table: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class StepRecord:
    """A snapshot of one executed batch (tables copied: the scheduler's lists move on)."""

    slots: tuple[SlotRecord, ...]
    freed_seq_ids: tuple[int, ...]
    block_copies: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return sum(slot.num_tokens for slot in self.slots)


@dataclass(slots=True)
class FakeModelRunner:
    """Implements ``lmaas.engine.llm.protocol.ModelRunner`` deterministically.

    The default next token is ``(last + 1 + seed) % vocab_size`` (seed 0 when unset), then the
    next id up that is not banned, then the smallest id the guide allows if it refuses that one.

    Args:
        vocab_size: Token ids are below this.
        num_blocks: Blocks allocated when ``allocate_kv_cache`` gets no byte budget.
        block_size: Block size until ``allocate_kv_cache`` sets another.
        next_token: Replaces the default choice of the next token.
        max_num_seqs: When set, a batch with more slots fails.
        max_num_batched_tokens: When set, a batch with more tokens fails.
        context_length: Reported by ``load``.
    """

    vocab_size: int = 1000
    num_blocks: int = 64
    block_size: int = 16
    next_token: NextTokenFn | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    context_length: int = 4096
    steps: list[StepRecord] = field(default_factory=list)
    """Every batch executed, in order."""
    _cache: list[list[int | None]] = field(default_factory=list, init=False, repr=False)
    _tables: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _computed: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._reset_cache()

    def load(self) -> ModelInfo:
        return ModelInfo(
            context_length=self.context_length,
            dtype="float32",
            device="cpu",
            vocab_size=self.vocab_size,
        )

    def allocate_kv_cache(
        self, budget_bytes: int | None, block_size: int, max_useful_tokens: int | None = None
    ) -> KVCacheLayout:
        bytes_per_block = block_size * _BYTES_PER_TOKEN
        num_blocks = self.num_blocks if budget_bytes is None else budget_bytes // bytes_per_block
        if num_blocks < 1:
            raise ModelLoadError(
                f"KV budget {budget_bytes} bytes holds no {block_size}-token block"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._reset_cache()
        return KVCacheLayout(block_size, num_blocks, bytes_per_block)

    def execute(self, batch: StepBatch) -> list[Sampled]:
        """Check the batch, "compute" its tokens into the cache, sample. Raises:
        StepContractError."""
        for seq_id in batch.freed_seq_ids:
            self._tables.pop(seq_id, None)
            self._computed.pop(seq_id, None)
        for src, dst in batch.block_copies:
            self._cache[dst] = list(self._cache[src])
        self._check_batch(batch)
        results: list[Sampled] = []
        for slot in batch.slots:
            context = self._compute(slot)
            if slot.sample:
                results.append(Sampled(self._choose(context, slot), logprob=0.0))
        self.steps.append(_record(batch))
        return results

    def _reset_cache(self) -> None:
        self._cache = [[None] * self.block_size for _ in range(self.num_blocks)]
        self._tables.clear()
        self._computed.clear()

    def _check_batch(self, batch: StepBatch) -> None:
        slots = batch.slots
        if len({slot.seq_id for slot in slots}) != len(slots):
            raise StepContractError("a sequence appears twice in one step")
        if self.max_num_seqs is not None and len(slots) > self.max_num_seqs:
            raise StepContractError(f"{len(slots)} slots > max_num_seqs {self.max_num_seqs}")
        limit = self.max_num_batched_tokens
        if limit is not None and batch.num_tokens > limit:
            raise StepContractError(f"{batch.num_tokens} tokens > budget {limit}")
        for slot in slots:
            self._check_slot(slot)
            self._tables[slot.seq_id] = list(slot.block_table)
        owners: dict[int, set[int]] = {}
        for seq_id, table in self._tables.items():
            for block in table:
                owners.setdefault(block, set()).add(seq_id)
        size = self.block_size
        for slot in slots:
            end = slot.start_pos + len(slot.token_ids)
            for index in range(slot.start_pos // size, -(-end // size)):
                block = slot.block_table[index]
                if owners[block] != {slot.seq_id}:
                    raise StepContractError(
                        f"seq {slot.seq_id} writes block {block} shared with {owners[block]}"
                    )

    def _check_slot(self, slot: SeqSlot) -> None:
        start, num_tokens = slot.start_pos, len(slot.token_ids)
        end = start + num_tokens
        where = f"seq {slot.seq_id} [{start}, {end})"
        if num_tokens < 1:
            raise StepContractError(f"{where}: no tokens")
        known = self._computed.get(slot.seq_id)
        if known is not None and known != start:
            raise StepContractError(f"{where}: {known} tokens were computed")
        if slot.token_ids != slot.history[start:end]:
            raise StepContractError(f"{where}: token_ids are not the history's")
        if slot.sample != (end == len(slot.history)):
            raise StepContractError(f"{where}: sample={slot.sample} with {len(slot.history)} known")
        if len(slot.block_table) != -(-end // self.block_size):
            raise StepContractError(f"{where}: {len(slot.block_table)} blocks")
        if any(not 0 <= block < self.num_blocks for block in slot.block_table):
            raise StepContractError(f"{where}: block id out of range in {slot.block_table}")

    def _compute(self, slot: SeqSlot) -> list[int]:
        """Read positions before the chunk back from the cache, write the chunk."""
        size, table, cache = self.block_size, slot.block_table, self._cache
        context = [cache[table[pos // size]][pos % size] for pos in range(slot.start_pos)]
        if context != slot.history[: slot.start_pos]:
            raise StepContractError(f"seq {slot.seq_id}: the cache does not hold its history")
        for offset, token in enumerate(slot.token_ids):
            pos = slot.start_pos + offset
            cache[table[pos // size]][pos % size] = token
        self._computed[slot.seq_id] = slot.start_pos + len(slot.token_ids)
        return slot.history[: slot.start_pos + len(slot.token_ids)]

    def _choose(self, context: Sequence[int], slot: SeqSlot) -> int:
        if self.next_token is not None:
            return self.next_token(context, slot)
        token = (context[-1] + 1 + (slot.sampling.seed or 0)) % self.vocab_size
        while token in slot.banned_token_ids:
            token = (token + 1) % self.vocab_size
        if slot.guide is not None:
            allowed = slot.guide.allowed_token_ids()
            if allowed is not None and token not in allowed:
                token = min(allowed)
        return token


def _record(batch: StepBatch) -> StepRecord:
    return StepRecord(
        slots=tuple(
            SlotRecord(s.seq_id, s.start_pos, len(s.token_ids), s.sample, tuple(s.block_table))
            for s in batch.slots
        ),
        freed_seq_ids=tuple(batch.freed_seq_ids),
        block_copies=tuple(batch.block_copies),
    )


class FakeTokenDecoder:
    """Id ``i`` reads ``w{i}``; words are joined by single spaces; special ids are skipped."""

    def __init__(self, special_ids: frozenset[int]) -> None:
        self._special = special_ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(
            token_text(i) for i in token_ids if not (skip_special_tokens and i in self._special)
        )


def token_text(token_id: int) -> str:
    return f"w{token_id}"


class FakePromptProcessor:
    """A whitespace tokenizer over a fixed vocabulary (implements ``PromptProcessor``).

    ``w17`` is token 17; any other word maps to a stable id from its CRC32 (never an EOS id).
    A chat request renders as ``role: content`` lines.

    Args:
        vocab_size: Ids are below this.
        eos_token_ids: Ids that end a sequence (special: skipped when decoding).
    """

    def __init__(self, vocab_size: int = 1000, eos_token_ids: frozenset[int] = frozenset({0})):
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._decoder = FakeTokenDecoder(eos_token_ids)

    @property
    def decoder(self) -> FakeTokenDecoder:
        return self._decoder

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if any(not 0 <= i < self._vocab_size for i in ids):
                raise InvalidRequestError("prompt token id outside the vocabulary", param="prompt")
        else:
            if request.messages is not None:
                text = "\n".join(f"{m.role}: {m.content}" for m in request.messages)
            else:
                text = request.prompt or ""
            ids = [self._word_id(word) for word in text.split()]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def token_text(self, token_id: int) -> str:
        return token_text(token_id)

    def _word_id(self, word: str) -> int:
        if word.startswith("w") and word[1:].isdigit() and int(word[1:]) < self._vocab_size:
            return int(word[1:])
        token = zlib.crc32(word.encode()) % self._vocab_size
        while token in self._eos:
            token = (token + 1) % self._vocab_size
        return token
