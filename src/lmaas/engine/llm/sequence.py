"""One sequence as the scheduler sees it: tokens, progress through the KV cache, blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lmaas.runtimes.llm.batch import SamplingConfig, SeqSlot, TokenGuide


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    """Queued: new, preempted (to be recomputed), or a sibling waiting for its prompt's fork."""
    RUNNING = "running"
    FINISHED = "finished"
    """Finished or aborted; its blocks are back in the pool."""


@dataclass(slots=True, eq=False)
class SchedSequence:
    """A generating sequence. The engine core creates it; the scheduler moves it along.

    ``history`` (prompt + outputs) is the list every :class:`SeqSlot` of this sequence
    references; the scheduler appends each sampled token to it. The engine core sets
    ``banned_token_ids`` and ``guide`` before each step; the scheduler copies them into the slot.
    """

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_tokens: int
    """Tokens this sequence may generate at most (the engine core stops it there)."""
    history: list[int] = field(default_factory=list)
    """Prompt + output ids; a copy of ``prompt_ids`` when left empty."""
    namespace: str = ""
    """The tenant: prefix-cache blocks are never shared across namespaces."""
    tenant: str = ""
    """Whose request this is: waiting sequences are admitted by weighted fair share of tenants."""
    weight: float = 1.0
    """The tenant's share weight."""
    arrival: float = 0.0
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    """Positions ``[0, num_computed_tokens)`` of ``history`` are in the KV cache."""
    block_table: list[int] = field(default_factory=list)
    banned_token_ids: frozenset[int] = frozenset()
    guide: TokenGuide | None = None
    choice_index: int = 0
    """Which of the request's ``n`` choices this is."""
    group_id: str = ""
    """Shared by the ``n`` sequences of one request; ``request_id`` when left empty."""
    block_hashes: list[int] = field(default_factory=list)
    """Prefix-cache chain hash of each full block of ``history`` hashed so far (kept across
    preemptions: the tokens do not change)."""
    num_registered_blocks: int = 0
    """Leading blocks of ``block_table`` already offered to the prefix cache."""
    num_cached_tokens: int = 0
    """Tokens the prefix cache supplied at the latest admission."""
    num_preemptions: int = 0
    pending_forks: list[SchedSequence] = field(default_factory=list)
    """Siblings (``n > 1``) that fork from this sequence once its prompt is computed."""

    def __post_init__(self) -> None:
        if not self.history:
            self.history = list(self.prompt_ids)
        if not self.group_id:
            self.group_id = self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.history) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        """A copy of the generated ids."""
        return self.history[len(self.prompt_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def next_slot(self, num_tokens: int) -> SeqSlot:
        """The step slot that computes the next ``num_tokens`` tokens (blocks already there).

        The slot references ``history`` and ``block_table``: nothing is copied but the chunk.
        """
        start = self.num_computed_tokens
        end = start + num_tokens
        history = self.history
        return SeqSlot(
            seq_id=self.seq_id,
            token_ids=[history[start]] if num_tokens == 1 else history[start:end],
            start_pos=start,
            block_table=self.block_table,
            sample=end == len(history),
            sampling=self.sampling,
            history=history,
            num_prompt_tokens=len(self.prompt_ids),
            banned_token_ids=self.banned_token_ids,
            guide=self.guide,
        )


def detach_pending_fork(sibling: SchedSequence, group: list[SchedSequence]) -> SchedSequence:
    """Detach a pending sibling from the leader it waits on (in ``group``); return that leader."""
    leader = next(seq for seq in group if sibling in seq.pending_forks)
    leader.pending_forks.remove(sibling)
    return leader


def hand_over_forks(leader: SchedSequence) -> SchedSequence:
    """A leader leaves before forking: its first pending sibling leads the others instead."""
    new_leader, *rest = leader.pending_forks
    leader.pending_forks = []
    new_leader.pending_forks = rest
    new_leader.block_hashes = leader.block_hashes
    return new_leader
