"""The step contract between the LLM scheduler (``lmaas.engine.llm``, plain Python) and the
model runner (``lmaas.runtimes.llm.paged``, torch).

Each engine step the scheduler builds one :class:`StepBatch`: for every scheduled sequence the
tokens to compute (a prefill chunk, or the one last token in decode), where they start, the KV
blocks that hold positions ``[0, start_pos + len(token_ids))``, and whether to sample a token
after them. The runner writes K/V for those tokens into the paged cache, runs attention over the
blocks, and returns one :class:`Sampled` per slot with ``sample=True``.

No torch here: the engine imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True, frozen=True)
class SamplingConfig:
    """Per-sequence sampling, already validated. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    """A seeded sequence draws from its own generator: reproducible whatever its neighbours."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    num_logprobs: int | None = None
    """None: no logprobs; 0: the sampled token's logprob; k > 0: also the top k alternatives."""

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


class TokenGuide(Protocol):
    """Constrains the next token (guided decoding: JSON schema, json_object)."""

    def allowed_token_ids(self) -> list[int] | None:
        """Ids the next token may take; None when anything goes."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        ...

    def is_finished(self) -> bool:
        """True once the constrained output is complete (the sequence then stops)."""
        ...


@dataclass(slots=True)
class SeqSlot:
    """One sequence in one step."""

    seq_id: int
    """Unique within the worker for the sequence's lifetime (a preempted sequence keeps it)."""
    token_ids: list[int]
    """Tokens to compute this step: a prefill chunk, or the last generated token in decode."""
    start_pos: int
    """Position of ``token_ids[0]``; also the number of tokens already in the KV cache."""
    block_table: list[int]
    """Physical KV blocks covering positions ``[0, start_pos + len(token_ids))``, in order."""
    sample: bool
    """Sample a token after this chunk (decode, or the last chunk of a prefill)."""
    sampling: SamplingConfig
    history: list[int] = field(default_factory=list)
    """Prompt + output ids so far (a shared reference, not a copy); read for penalties."""
    num_prompt_tokens: int = 0
    """``history[:num_prompt_tokens]`` is the prompt (presence/frequency count outputs only)."""
    banned_token_ids: frozenset[int] = frozenset()
    """Ids the sampled token may not be this step (stop ids until ``min_tokens`` is reached)."""
    guide: TokenGuide | None = None


@dataclass(slots=True)
class StepBatch:
    slots: list[SeqSlot]
    freed_seq_ids: list[int] = field(default_factory=list)
    """Sequences finished, aborted or preempted since the last step: drop their runner state
    (e.g. seeded generators). A preempted sequence that comes back restarts its generator."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """Copy KV block ``src`` into ``dst`` before running (copy-on-write when ``n > 1`` forks)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(slot.token_ids) for slot in self.slots)


@dataclass(slots=True, frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(slots=True, frozen=True)
class KVCacheLayout:
    """What the runner allocated; the scheduler's block manager mirrors it."""

    block_size: int
    num_blocks: int
    bytes_per_block: int
    extra_bytes: int = 0
    """Memory inside the budget besides the blocks (the paged runner's decode view)."""

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + self.extra_bytes
