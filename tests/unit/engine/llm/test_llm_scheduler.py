"""Scheduler: continuous batching, chunked prefill, limits, preemption, prefix cache."""

from __future__ import annotations

import pytest
from llm_sched_helpers import Driver, check_invariants, expected_stream, make_seq

from lmaas.core.errors import InvalidRequestError, OverloadedError
from lmaas.engine.llm.scheduler import Scheduler, SchedulerConfig
from lmaas.engine.llm.sequence import SeqStatus
from lmaas.runtimes.llm.batch import Sampled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_num_seqs": 0}, r"max_num_seqs \(0\)"),
        ({"max_num_batched_tokens": -1}, r"max_num_batched_tokens \(-1\)"),
        ({"max_waiting": 0}, r"max_waiting \(0\)"),
        ({"block_size": 0}, r"block_size \(0\)"),
        ({"max_chunk_tokens": 0}, r"max_chunk_tokens \(0\)"),
        ({"retry_after_s": -1.0}, r"retry_after_s \(-1.0\)"),
    ],
)
def test_config_quotes_bad_values(kwargs: dict[str, int | float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_one_request_runs_to_completion_and_frees_everything() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=16)
    seq = make_seq(1, [5, 6, 7, 8, 9], max_tokens=6)
    assert seq.num_prompt_tokens == 5 and seq.group_id == "req-1"
    driver.scheduler.add(seq)
    assert driver.scheduler.has_work() and driver.scheduler.num_waiting == 1
    first = driver.step()
    assert [(s.start_pos, s.token_ids, s.sample) for s in first.slots] == [
        (0, [5, 6, 7, 8, 9], True)
    ]
    assert first.slots[0].history is seq.history and first.slots[0].num_prompt_tokens == 5
    assert driver.run() == 5
    assert driver.outputs[1] == expected_stream([9], 6) == seq.output_ids
    assert seq.is_finished and seq.num_output_tokens == 6
    assert not driver.scheduler.has_work() and driver.scheduler.num_free_blocks == 16
    assert driver.scheduler.get(1) is None


def test_requests_join_and_leave_every_step() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=64)
    scheduler = driver.scheduler
    for seq_id in range(1, 7):
        scheduler.add(make_seq(seq_id, [seq_id * 10, seq_id * 10 + 1], max_tokens=3))
        batch = driver.step()
        ids = [slot.seq_id for slot in batch.slots]
        # The newcomer is prefilled in the same step as the running streams decode.
        assert ids == list(range(max(1, seq_id - 2), seq_id + 1))
        assert all(slot.sample for slot in batch.slots)
    assert driver.finished == [1, 2, 3, 4]
    driver.run()
    for seq_id in range(1, 7):
        assert driver.outputs[seq_id] == expected_stream([seq_id * 10 + 1], 3)


def test_chunked_prefill_never_stalls_running_decodes() -> None:
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=8)
    driver = Driver(config, num_blocks=64)
    scheduler = driver.scheduler
    for seq_id in (1, 2):
        scheduler.add(make_seq(seq_id, [seq_id], max_tokens=40))
    driver.step()
    long_prompt = list(range(100, 160))
    scheduler.add(make_seq(3, long_prompt, max_tokens=2))
    chunks: list[int] = []
    while 3 not in driver.outputs:
        batch = driver.step()
        by_id = {slot.seq_id: slot for slot in batch.slots}
        assert len(by_id[1].token_ids) == len(by_id[2].token_ids) == 1
        chunks.append(len(by_id[3].token_ids))
        assert batch.num_tokens <= 8
    assert chunks == [6] * 10
    assert driver.outputs[3] == expected_stream(long_prompt, 1)


def test_partial_prefill_leaves_budget_to_newer_decodes_and_chunk_cap_applies() -> None:
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=10, max_chunk_tokens=5)
    driver = Driver(config, num_blocks=64)
    scheduler = driver.scheduler
    scheduler.add(make_seq(1, list(range(30)), max_tokens=2))
    scheduler.add(make_seq(2, [7], max_tokens=5))
    first = driver.step()
    assert [(s.seq_id, len(s.token_ids)) for s in first.slots] == [(1, 5), (2, 1)]
    second = driver.step()
    # seq 1 (older) is still prefilling; seq 2 (newer) decodes in the same step.
    assert [(s.seq_id, len(s.token_ids)) for s in second.slots] == [(1, 5), (2, 1)]
    driver.run()
    assert driver.outputs[1] == expected_stream(list(range(30)), 2)


def test_token_budget_and_max_num_seqs_are_respected() -> None:
    config = SchedulerConfig(block_size=4, max_num_seqs=3, max_num_batched_tokens=12)
    driver = Driver(config, num_blocks=64)
    for seq_id in range(1, 9):
        driver.scheduler.add(make_seq(seq_id, list(range(seq_id, seq_id + 7)), max_tokens=4))
    driver.run()
    assert all(len(b.slots) <= 3 and b.num_tokens <= 12 for b in driver.batches)
    assert max(len(b.slots) for b in driver.batches) == 3
    assert sorted(driver.finished) == list(range(1, 9))
    for seq_id in range(1, 9):
        assert driver.outputs[seq_id] == expected_stream([seq_id + 6], 4)


def test_tiny_budget_lets_decodes_wait_their_turn() -> None:
    driver = Driver(SchedulerConfig(block_size=4, max_num_batched_tokens=1), num_blocks=16)
    for seq_id in (1, 2):
        driver.scheduler.add(make_seq(seq_id, [seq_id], max_tokens=3))
    driver.run()
    assert all(b.num_tokens == 1 for b in driver.batches)
    assert driver.outputs == {1: expected_stream([1], 3), 2: expected_stream([2], 3)}


def test_newest_is_preempted_when_blocks_run_out_and_all_finish_identically() -> None:
    config = SchedulerConfig(block_size=4, max_num_seqs=4)
    prompts = {seq_id: [seq_id * 100 + i for i in range(6)] for seq_id in (1, 2, 3)}
    driver = Driver(config, num_blocks=8)
    for seq_id, prompt in prompts.items():
        driver.scheduler.add(make_seq(seq_id, prompt, max_tokens=10))
    driver.run()
    first_preempted = next(b.freed_seq_ids[0] for b in driver.batches if b.freed_seq_ids)
    assert first_preempted == 3
    stats = driver.scheduler.stats()
    assert stats["num_preemptions"] >= 1 and stats["num_free_blocks"] == 8
    for seq_id, prompt in prompts.items():
        assert driver.outputs[seq_id] == expected_stream(prompt, 10)


def test_a_lone_sequence_that_fills_the_whole_cache_finishes() -> None:
    driver = Driver(SchedulerConfig(block_size=4, max_num_batched_tokens=5), num_blocks=4)
    driver.scheduler.add(make_seq(1, list(range(11)), max_tokens=5))
    driver.scheduler.add(make_seq(2, list(range(50, 61)), max_tokens=5))
    driver.run()
    assert driver.outputs[1] == expected_stream(list(range(11)), 5)
    assert driver.outputs[2] == expected_stream(list(range(50, 61)), 5)
    assert driver.scheduler.num_free_blocks == 4


def test_prefill_that_cannot_grow_preempts_newer_prefills() -> None:
    config = SchedulerConfig(block_size=2, max_num_batched_tokens=8, max_chunk_tokens=3)
    driver = Driver(config, num_blocks=6)
    scheduler = driver.scheduler
    scheduler.add(make_seq(1, list(range(8)), max_tokens=4))
    scheduler.add(make_seq(2, list(range(20, 28)), max_tokens=4))
    driver.step()
    driver.step()
    assert scheduler.num_free_blocks == 0
    third = driver.step()
    assert third.freed_seq_ids == [2] and [s.seq_id for s in third.slots] == [1]
    driver.run()
    assert driver.outputs[1] == expected_stream(list(range(8)), 4)
    assert driver.outputs[2] == expected_stream(list(range(20, 28)), 4)


def test_prefix_cache_hits_share_a_system_prompt_within_a_namespace() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    scheduler = driver.scheduler
    system = list(range(500, 512))
    scheduler.add(make_seq(1, [*system, 1, 2], max_tokens=2))
    driver.run()
    scheduler.add(make_seq(2, [*system, 3, 4, 5], max_tokens=2))
    hit = driver.step().slots[0]
    assert hit.start_pos == 12 and hit.token_ids == [3, 4, 5]
    scheduler.add(make_seq(3, [*system, 3, 4], max_tokens=2, namespace="other-tenant"))
    miss = driver.step().slots[-1]
    assert miss.seq_id == 3 and miss.start_pos == 0
    driver.run()
    stats = scheduler.stats()
    assert stats["prefix_cache_hit_tokens"] == 12
    assert stats["prefix_cache_query_tokens"] == 14 + 15 + 14
    assert stats["num_cached_blocks"] > 0 and scheduler.num_free_blocks == 32
    assert driver.outputs[2] == expected_stream([5], 2)


def test_an_identical_prompt_recomputes_only_its_last_token() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    prompt = list(range(8))
    driver.scheduler.add(make_seq(1, prompt, max_tokens=1))
    driver.run()
    driver.scheduler.add(make_seq(2, prompt, max_tokens=1))
    slot = driver.step().slots[0]
    assert (slot.start_pos, slot.token_ids) == (4, [4, 5, 6, 7])
    assert driver.scheduler.get(2) is None and driver.outputs[2] == [8]


def test_prefix_caching_off() -> None:
    config = SchedulerConfig(block_size=4, enable_prefix_caching=False)
    driver = Driver(config, num_blocks=16)
    for seq_id in (1, 2):
        driver.scheduler.add(make_seq(seq_id, list(range(9)), max_tokens=2))
        driver.run()
    assert driver.scheduler.stats()["prefix_cache_hit_tokens"] == 0
    assert driver.scheduler.block_manager.num_cached_blocks == 0


def test_waiting_queue_is_bounded() -> None:
    scheduler = Scheduler(SchedulerConfig(max_waiting=2, retry_after_s=3.0), num_blocks=8)
    scheduler.add(make_seq(1, [1]))
    scheduler.add(make_seq(2, [1]))
    with pytest.raises(OverloadedError, match="waiting queue is full") as caught:
        scheduler.add(make_seq(3, [1]))
    assert caught.value.retry_after_s == 3.0
    assert scheduler.num_waiting == 2 and scheduler.get(3) is None


def test_requests_that_cannot_fit_or_are_malformed_are_refused() -> None:
    scheduler = Scheduler(SchedulerConfig(block_size=4, max_num_seqs=2), num_blocks=4)
    assert scheduler.max_seq_len == 16
    with pytest.raises(InvalidRequestError, match=r"prompt \(12 tokens\) \+ max_tokens \(5\)"):
        scheduler.add(make_seq(1, list(range(12)), max_tokens=5))
    with pytest.raises(InvalidRequestError, match=r"n \(3\) exceeds max_num_seqs \(2\)"):
        scheduler.add_group([make_seq(i, [1], request_id="r") for i in (1, 2, 3)])
    with pytest.raises(ValueError, match="at least one"):
        scheduler.add_group([])
    with pytest.raises(ValueError, match="does not start where"):
        scheduler.add_group([make_seq(1, [1], request_id="r"), make_seq(2, [2], request_id="r")])
    started = make_seq(1, [1])
    started.status = SeqStatus.RUNNING
    with pytest.raises(ValueError, match="sequence 1 is not new"):
        scheduler.add(started)
    scheduler.add(make_seq(1, [1]))
    with pytest.raises(ValueError, match="sequence id 1 is in use"):
        scheduler.add(make_seq(1, [1]))
    assert scheduler.num_waiting == 1


def test_on_step_done_checks_results_and_skips_aborted_sequences() -> None:
    scheduler = Scheduler(SchedulerConfig(block_size=4), num_blocks=8)
    scheduler.add(make_seq(1, [1, 2]))
    scheduler.add(make_seq(2, [3, 4]))
    batch = scheduler.schedule()
    with pytest.raises(ValueError, match="1 results for 2 sampling slots"):
        scheduler.on_step_done(batch, [Sampled(9)])
    scheduler.abort(2)
    done = scheduler.on_step_done(batch, [Sampled(9), Sampled(8)])
    assert [(seq.seq_id, result.token_id) for seq, result in done] == [(1, 9)]
    assert scheduler.num_free_blocks == 7
    check_invariants(scheduler)


def test_freed_ids_wait_for_a_batch_that_runs() -> None:
    scheduler = Scheduler(SchedulerConfig(block_size=4), num_blocks=8)
    scheduler.add(make_seq(1, [1, 2]))
    batch = scheduler.schedule()
    scheduler.on_step_done(batch, [Sampled(3)])
    scheduler.finish(1)
    scheduler.add_group([make_seq(2, [5], request_id="g"), make_seq(3, [5], request_id="g")])
    # A one-token prompt with n=2: admission computes nothing, the fork comes next step.
    empty = scheduler.schedule()
    assert empty.slots == [] and empty.freed_seq_ids == []
    nxt = scheduler.schedule()
    assert [s.seq_id for s in nxt.slots] == [2, 3] and nxt.freed_seq_ids == [1]


def test_status_moves_through_the_lifecycle() -> None:
    scheduler = Scheduler(SchedulerConfig(block_size=4), num_blocks=8)
    seq = make_seq(1, [1, 2, 3])
    scheduler.add(seq)
    statuses = [seq.status]
    scheduler.schedule()
    statuses.append(seq.status)
    scheduler.abort(1)
    statuses.append(seq.status)
    assert statuses == [SeqStatus.WAITING, SeqStatus.RUNNING, SeqStatus.FINISHED]
    assert scheduler.num_running == 0
    scheduler.abort(1)  # unknown now: ignored
    scheduler.abort_request("nobody")
