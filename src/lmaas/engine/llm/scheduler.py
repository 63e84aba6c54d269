"""Continuous batching with chunked prefill over a paged KV cache (plain Python, no torch).

Each step, :meth:`Scheduler.schedule` walks the running sequences oldest first: a decode
computes its one last token, a partial prefill its next chunk, and prefill chunks leave enough of
the token budget to the decodes later in the walk, so a long prompt never stalls running streams.
Waiting sequences are then admitted while the budget, ``max_num_seqs`` and the free blocks
allow, reusing their cached prefix. Blocks are allocated for exactly the tokens computed this step.

Admission is a **weighted fair share between tenants** (``SchedSequence.tenant``/``weight``, set
from the request the gateway stamped): every token a sequence computes (prefill or decode) adds
``1 / weight`` to its tenant's service, and the next sequence admitted is the oldest waiting one of
the tenant with the least service (start-time fair queueing by tokens). A tenant that becomes
active starts at the least service of the active ones, so idling banks no credit. One tenant
flooding the queue therefore delays another's requests by a bounded number of admissions, not by
the whole backlog, and tenants with weights 3:1 get about 3:1 of the tokens while both wait.
Within a tenant, and with a single tenant, it is first come, first served; a preempted sequence
is readmitted before anyone else.

When a running sequence needs a block and none is free, the newest running sequences are
preempted: their blocks are freed (full ones stay in the prefix cache, so recomputing is cheap)
and they go back to the front of the queue. A sequence that fits the cache on its own therefore
always finishes; the oldest one always makes progress.

``n > 1``: the group's first sequence (the leader) prefills the prompt but its last token; the
others wait in ``leader.pending_forks``. The next step forks the leader's block table to each of
them (full blocks shared, the partial last block copied: ``StepBatch.block_copies``), and each of
the ``n`` computes the last prompt token as its own one-token chunk and samples its own first
token (own seed). One extra step for the group, never a second prefill. Their slots in
``max_num_seqs`` are reserved when the leader is admitted."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmaas.core.errors import OverloadedError
from lmaas.engine.llm.blocks import BlockManager
from lmaas.engine.llm.scheduler_config import SchedulerConfig, check_group
from lmaas.engine.llm.sequence import SchedSequence, SeqStatus, detach_pending_fork, hand_over_forks
from lmaas.runtimes.llm.batch import Sampled, SeqSlot, StepBatch

__all__ = ["Scheduler", "SchedulerConfig"]


@dataclass(slots=True)
class _Step:
    """What one call to ``schedule`` builds."""

    budget: int
    slots: list[SeqSlot] = field(default_factory=list)
    num_decodes_left: int = 0
    """Decodes later in the running walk: prefill chunks leave this much budget to them."""
    blocked: bool = False
    """A running sequence was preempted or held for lack of blocks: admit nobody."""


class Scheduler:
    """Decides, step by step, which tokens of which sequences the model computes.

    Call :meth:`schedule`, run the batch, then :meth:`on_step_done` with the sampled tokens.
    :meth:`finish` and :meth:`abort` may come between steps (or while the model runs: the freed
    blocks are only handed out again by the next :meth:`schedule`).

    Args:
        config: The limits.
        num_blocks: KV blocks the runner allocated (``KVCacheLayout.num_blocks``).
    """

    def __init__(self, config: SchedulerConfig, num_blocks: int) -> None:
        self.config = config
        self._blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self._waiting: deque[SchedSequence] = deque()
        self._num_waiting_by_tenant: dict[str, int] = {}
        self._num_seqs_by_tenant: dict[str, int] = {}
        """Sequences held (waiting or running) per active tenant."""
        self._service: dict[str, float] = {}
        """Weighted tokens computed per active tenant (fair-share admission)."""
        self._running: list[SchedSequence] = []
        self._seqs: dict[int, SchedSequence] = {}
        self._by_request: dict[str, list[SchedSequence]] = {}
        self._num_reserved = 0
        """Pending forks of running leaders: their slots in ``max_num_seqs``."""
        self._freed: list[int] = []
        self._copies: list[tuple[int, int]] = []
        self._num_preemptions = 0
        self._num_hit_tokens = 0
        self._num_query_tokens = 0

    # ------------------------------------------------------------------ queries

    @property
    def block_manager(self) -> BlockManager:
        return self._blocks

    @property
    def max_seq_len(self) -> int:
        """The most tokens (prompt + outputs) one sequence can hold: the whole cache."""
        return self._blocks.num_blocks * self._blocks.block_size

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_blocks(self) -> int:
        return self._blocks.num_free_blocks

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def get(self, seq_id: int) -> SchedSequence | None:
        return self._seqs.get(seq_id)

    def stats(self) -> dict[str, int]:
        """Counters for heartbeats and metrics."""
        return {
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "num_free_blocks": self._blocks.num_free_blocks,
            "num_blocks": self._blocks.num_blocks,
            "num_cached_blocks": self._blocks.num_cached_blocks,
            "prefix_cache_hit_tokens": self._num_hit_tokens,
            "prefix_cache_query_tokens": self._num_query_tokens,
            "num_preemptions": self._num_preemptions,
        }

    # ------------------------------------------------------------------ admission

    def add(self, seq: SchedSequence) -> None:
        """Queue a new sequence.

        Raises:
            OverloadedError: The waiting queue is full (retryable).
            InvalidRequestError: Prompt + ``max_tokens`` exceed what the whole cache holds.
            ValueError: The sequence id is in use or the sequence is not new.
        """
        self.add_group([seq])

    def add_group(self, seqs: Sequence[SchedSequence]) -> None:
        """Queue the ``n`` sequences of one request; they share the prompt's blocks.

        Raises:
            OverloadedError: The waiting queue is full (retryable).
            InvalidRequestError: More sequences than ``max_num_seqs``, or prompt +
                ``max_tokens`` beyond the cache.
            ValueError: Empty group, prompts that differ, an id in use, a sequence not new.
        """
        for seq in seqs:
            if seq.seq_id in self._seqs:
                raise ValueError(f"sequence id {seq.seq_id} is in use")
        check_group(self.config, self.max_seq_len, seqs)
        if len(self._waiting) >= self.config.max_waiting:
            raise OverloadedError(
                f"the waiting queue is full ({self.config.max_waiting} requests)",
                retry_after_s=self.config.retry_after_s,
            )
        leader = seqs[0]
        leader.pending_forks = list(seqs[1:])
        tenant = leader.tenant
        if tenant not in self._num_seqs_by_tenant:
            # Newly active: it starts level with the least served, banking nothing while idle.
            self._service[tenant] = min(self._service.values(), default=0.0)
            self._num_seqs_by_tenant[tenant] = 0
        for seq in seqs:
            seq.tenant = tenant
            seq.weight = leader.weight if leader.weight > 0 else 1.0
            self._seqs[seq.seq_id] = seq
            self._by_request.setdefault(seq.request_id, []).append(seq)
            self._num_seqs_by_tenant[tenant] += 1
        self._enqueue(leader)

    def _enqueue(self, seq: SchedSequence, *, front: bool = False) -> None:
        if front:
            self._waiting.appendleft(seq)
        else:
            self._waiting.append(seq)
        counts = self._num_waiting_by_tenant
        counts[seq.tenant] = counts.get(seq.tenant, 0) + 1

    def _dequeue(self, seq: SchedSequence) -> None:
        if self._waiting[0] is seq:
            self._waiting.popleft()
        else:
            self._waiting.remove(seq)
        counts = self._num_waiting_by_tenant
        counts[seq.tenant] -= 1
        if not counts[seq.tenant]:
            del counts[seq.tenant]

    def _next_waiting(self) -> SchedSequence:
        """The waiting sequence to admit next: a preempted one first, else the oldest of the
        tenant served least (weighted)."""
        head = self._waiting[0]
        num_tenants = len(self._num_waiting_by_tenant)
        if num_tenants == 1 or head.num_preemptions:
            return head
        heads: dict[str, SchedSequence] = {}
        for seq in self._waiting:
            if seq.tenant not in heads:
                heads[seq.tenant] = seq
                if len(heads) == num_tenants:
                    break
        service = self._service
        return min(heads.values(), key=lambda seq: service[seq.tenant])

    # ------------------------------------------------------------------ the step

    def schedule(self) -> StepBatch:
        """Build the next step: running sequences first, then new admissions."""
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.blocked:
            self._admit_waiting(step)
        if not step.slots:
            # Nothing to run (all held): an engine may skip executing an empty batch, so the
            # freed ids and copies wait for the next one rather than being lost.
            return StepBatch([])
        batch = StepBatch(step.slots, self._freed, self._copies)
        self._freed = []
        self._copies = []
        return batch

    def on_step_done(
        self, batch: StepBatch, sampled: Sequence[Sampled]
    ) -> list[tuple[SchedSequence, Sampled]]:
        """Record a step's results: progress, sampled tokens, newly full blocks.

        Args:
            batch: What :meth:`schedule` returned.
            sampled: One result per slot with ``sample=True``, in slot order.

        Returns:
            Each running sequence that sampled, with its token (the token is already appended
            to its history); sequences finished or aborted during the step are skipped.

        Raises:
            ValueError: ``sampled`` does not match the batch's sampling slots.
        """
        num_sampling = sum(1 for slot in batch.slots if slot.sample)
        if len(sampled) != num_sampling:
            raise ValueError(f"{len(sampled)} results for {num_sampling} sampling slots")
        results: list[tuple[SchedSequence, Sampled]] = []
        next_result = iter(sampled).__next__
        block_size = self._blocks.block_size
        for slot in batch.slots:
            result = next_result() if slot.sample else None
            seq = self._seqs.get(slot.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens += len(slot.token_ids)
            if result is not None:
                seq.history.append(result.token_id)
                results.append((seq, result))
            if seq.num_computed_tokens // block_size > seq.num_registered_blocks:
                self._cache_full_blocks(seq)
        return results

    def _cache_full_blocks(self, seq: SchedSequence) -> None:
        num_full = seq.num_computed_tokens // self._blocks.block_size
        self._blocks.cache_full_blocks(
            seq.history,
            seq.block_table,
            seq.block_hashes,
            seq.namespace,
            seq.num_registered_blocks,
            num_full,
        )
        seq.num_registered_blocks = num_full

    def _schedule_running(self, step: _Step) -> None:
        running = self._running
        block_size = self._blocks.block_size
        step.num_decodes_left = sum(1 for seq in running if self._num_remaining(seq) == 1)
        index = 0
        while index < len(running):
            seq = running[index]
            remaining = self._num_remaining(seq)
            if remaining == 0:
                # Only a leader whose prompt is computed but its last token: fork, then revisit.
                if not (seq.pending_forks and self._fork(seq, index, step)):
                    index += 1
                continue
            if remaining == 1:
                step.num_decodes_left -= 1
                num_tokens = min(1, step.budget)
            else:
                num_tokens = min(remaining, step.budget - step.num_decodes_left)
                if self.config.max_chunk_tokens is not None:
                    num_tokens = min(num_tokens, self.config.max_chunk_tokens)
            if num_tokens > 0:
                if seq.num_computed_tokens + num_tokens > len(seq.block_table) * block_size:
                    num_tokens = self._fit_blocks(seq, index, num_tokens, step)
                if num_tokens < 0:
                    return  # it preempted itself, the newest: the walk is over
                if num_tokens > 0:
                    self._add_slot(seq, num_tokens, step)
            index += 1

    def _fit_blocks(self, seq: SchedSequence, index: int, num_tokens: int, step: _Step) -> int:
        """Allocate blocks for ``num_tokens`` more tokens of a running sequence.

        A prefill chunk shrinks to the free blocks; with none free, newer sequences are
        preempted. Returns the tokens to compute: 0 to hold the sequence this step, -1 when it
        was preempted itself.
        """
        blocks = self._blocks
        block_size = blocks.block_size
        while True:
            room = len(seq.block_table) * block_size - seq.num_computed_tokens
            capacity = room + blocks.num_free_blocks * block_size
            if capacity >= num_tokens or (capacity > 0 and num_tokens > 1):
                num_tokens = min(num_tokens, capacity)
                needed = blocks.num_blocks_for(seq.num_computed_tokens + num_tokens)
                seq.block_table.extend(blocks.allocate(needed - len(seq.block_table)))
                return num_tokens
            if len(self._running) - 1 > index:
                self._preempt_newest(step)
                continue
            step.blocked = True
            if num_tokens > 1:
                return 0  # the newest prefill keeps its blocks; older ones preempt it if need be
            self._preempt(self._running.pop())
            return -1

    def _fork(self, leader: SchedSequence, index: int, step: _Step) -> bool:
        """Give the leader's pending siblings its block table; False to hold (no blocks)."""
        siblings = leader.pending_forks
        num_computed = leader.num_computed_tokens
        num_copies = len(siblings) if num_computed % self._blocks.block_size else 0
        while not self._blocks.can_allocate(num_copies):
            if len(self._running) - 1 <= index:
                step.blocked = True
                return False
            self._preempt_newest(step)
        for sibling in siblings:
            sibling.block_table, copies = self._blocks.fork(leader.block_table, num_computed)
            self._copies.extend(copies)
            sibling.block_hashes = list(leader.block_hashes)
            sibling.num_computed_tokens = num_computed
            sibling.num_registered_blocks = leader.num_registered_blocks
            sibling.status = SeqStatus.RUNNING
        self._running[index + 1 : index + 1] = siblings
        self._num_reserved -= len(siblings)
        leader.pending_forks = []
        step.num_decodes_left += len(siblings) + 1
        return True

    def _admit_waiting(self, step: _Step) -> None:
        blocks = self._blocks
        max_num_seqs = self.config.max_num_seqs
        while self._waiting and step.budget > 0:
            seq = self._next_waiting()
            num_forks = len(seq.pending_forks)
            if len(self._running) + self._num_reserved + 1 + num_forks > max_num_seqs:
                return
            cached = blocks.lookup_prefix(seq.history, seq.namespace, seq.block_hashes)
            num_cached = len(cached) * blocks.block_size
            num_tokens = min(self._target(seq) - num_cached, step.budget)
            if self.config.max_chunk_tokens is not None:
                num_tokens = min(num_tokens, self.config.max_chunk_tokens)
            needed = blocks.num_blocks_for(num_cached + num_tokens) - len(cached)
            if not blocks.can_allocate(needed + blocks.num_evictable(cached)):
                return
            self._dequeue(seq)
            blocks.acquire(cached)
            seq.block_table = cached + blocks.allocate(needed)
            seq.num_computed_tokens = seq.num_cached_tokens = num_cached
            seq.num_registered_blocks = len(cached)
            seq.status = SeqStatus.RUNNING
            self._running.append(seq)
            self._num_reserved += num_forks
            self._num_hit_tokens += num_cached
            self._num_query_tokens += len(seq.history)
            if num_tokens > 0:
                self._add_slot(seq, num_tokens, step)

    def _add_slot(self, seq: SchedSequence, num_tokens: int, step: _Step) -> None:
        step.slots.append(seq.next_slot(num_tokens))
        step.budget -= num_tokens
        self._service[seq.tenant] += num_tokens / seq.weight

    @staticmethod
    def _target(seq: SchedSequence) -> int:
        """Tokens to have in the cache before sampling; a leader stops short of its last one."""
        return len(seq.history) - 1 if seq.pending_forks else len(seq.history)

    def _num_remaining(self, seq: SchedSequence) -> int:
        return self._target(seq) - seq.num_computed_tokens

    # ------------------------------------------------------------------ leaving

    def _preempt_newest(self, step: _Step) -> None:
        victim = self._running.pop()
        if self._num_remaining(victim) == 1:
            step.num_decodes_left -= 1
        self._preempt(victim)
        step.blocked = True

    def _preempt(self, seq: SchedSequence) -> None:
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self._enqueue(seq, front=True)

    def _release(self, seq: SchedSequence) -> None:
        """Free a running sequence's blocks (it is off the running list already)."""
        self._blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        self._num_reserved -= len(seq.pending_forks)
        self._freed.append(seq.seq_id)

    def finish(self, seq_id: int) -> None:
        """The engine core stopped the sequence: free its blocks (full ones stay cached)."""
        self.abort(seq_id)

    def abort_request(self, request_id: str) -> None:
        """Abort every sequence of a request (unknown ids are ignored)."""
        for seq in reversed(self._by_request.get(request_id, [])):
            self.abort(seq.seq_id)

    def abort(self, seq_id: int) -> None:
        """Drop a sequence wherever it is; its blocks are free at once. Unknown ids: no-op."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        group = self._by_request[seq.request_id]
        group.remove(seq)
        if not group:
            del self._by_request[seq.request_id]
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
            self._release(seq)
        elif seq in self._waiting:
            self._dequeue(seq)
        else:
            if detach_pending_fork(seq, group).status is SeqStatus.RUNNING:
                self._num_reserved -= 1
        seq.status = SeqStatus.FINISHED
        if seq.pending_forks:
            # It left before forking: the first pending sibling prefills for the rest.
            self._enqueue(hand_over_forks(seq), front=True)
        tenant = seq.tenant
        self._num_seqs_by_tenant[tenant] -= 1
        if not self._num_seqs_by_tenant[tenant]:
            del self._num_seqs_by_tenant[tenant]
            del self._service[tenant]
