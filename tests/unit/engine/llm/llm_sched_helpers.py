"""Drives a Scheduler with a FakeModelRunner the way the engine core does, checking invariants."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lmaas.engine.llm.scheduler import Scheduler, SchedulerConfig
from lmaas.engine.llm.sequence import SchedSequence, SeqStatus
from lmaas.runtimes.llm.batch import SamplingConfig, StepBatch
from lmaas.testing.llm_fakes import FakeModelRunner


def make_seq(
    seq_id: int,
    prompt: list[int],
    max_tokens: int = 8,
    *,
    request_id: str | None = None,
    namespace: str = "",
    seed: int | None = None,
    choice_index: int = 0,
) -> SchedSequence:
    return SchedSequence(
        seq_id=seq_id,
        request_id=request_id or f"req-{seq_id}",
        prompt_ids=list(prompt),
        sampling=SamplingConfig(temperature=0.0, seed=seed),
        max_tokens=max_tokens,
        namespace=namespace,
        choice_index=choice_index,
    )


def check_invariants(scheduler: Scheduler) -> None:
    """Block accounting and per-sequence state agree after a completed step."""
    blocks = scheduler.block_manager
    in_use = [b for b in range(blocks.num_blocks) if blocks.ref_count(b) > 0]
    assert blocks.num_free_blocks + len(in_use) == blocks.num_blocks
    references: Counter[int] = Counter()
    running = scheduler._running
    for seq in running:
        assert seq.status is SeqStatus.RUNNING
        assert len(seq.block_table) == blocks.num_blocks_for(seq.num_computed_tokens)
        references.update(seq.block_table)
    assert references == Counter({b: blocks.ref_count(b) for b in in_use})
    for seq in scheduler._waiting:
        assert seq.status is SeqStatus.WAITING
        assert not seq.block_table and seq.num_computed_tokens == 0
    assert len(running) + scheduler._num_reserved <= scheduler.config.max_num_seqs
    assert scheduler._num_reserved == sum(len(s.pending_forks) for s in running)


@dataclass
class Driver:
    """schedule → FakeModelRunner.execute → on_step_done → finish at max_tokens."""

    config: SchedulerConfig
    num_blocks: int
    scheduler: Scheduler = field(init=False)
    runner: FakeModelRunner = field(init=False)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)
    batches: list[StepBatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.config, self.num_blocks)
        self.runner = FakeModelRunner(
            num_blocks=self.num_blocks,
            block_size=self.config.block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
        )

    def step(self) -> StepBatch:
        batch = self.scheduler.schedule()
        self.batches.append(batch)
        sampled = self.runner.execute(batch)
        for seq, result in self.scheduler.on_step_done(batch, sampled):
            self.outputs.setdefault(seq.seq_id, []).append(result.token_id)
            if seq.num_output_tokens >= seq.max_tokens:
                self.scheduler.finish(seq.seq_id)
                self.finished.append(seq.seq_id)
        check_invariants(self.scheduler)
        return batch

    def run(self, max_steps: int = 1000) -> int:
        """Step until idle; returns the number of steps."""
        for num_steps in range(max_steps):
            if not self.scheduler.has_work():
                return num_steps
            self.step()
        raise AssertionError(f"still busy after {max_steps} steps")


def expected_stream(
    prompt: list[int], max_tokens: int, seed: int = 0, vocab: int = 1000
) -> list[int]:
    """What FakeModelRunner's default rule generates for a prompt."""
    out: list[int] = []
    last = prompt[-1]
    for _ in range(max_tokens):
        last = (last + 1 + seed) % vocab
        out.append(last)
    return out
