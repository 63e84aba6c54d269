"""n > 1 (fork + copy-on-write) and aborts (blocks back within one step)."""

from __future__ import annotations

from llm_sched_helpers import Driver, check_invariants, expected_stream, make_seq

from lmaas.engine.llm.scheduler import SchedulerConfig
from lmaas.engine.llm.sequence import SchedSequence, SeqStatus


def _group(first_id: int, prompt: list[int], n: int, max_tokens: int = 4) -> list[SchedSequence]:
    return [
        make_seq(first_id + i, prompt, max_tokens, request_id="group", seed=i, choice_index=i)
        for i in range(n)
    ]


def test_n_choices_prefill_once_then_fork_with_a_copied_partial_block() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    prompt = list(range(10, 20))
    seqs = _group(1, prompt, n=3)
    driver.scheduler.add_group(seqs)
    assert seqs[0].pending_forks == seqs[1:]
    first = driver.step()
    assert [(s.seq_id, s.start_pos, len(s.token_ids), s.sample) for s in first.slots] == [
        (1, 0, 9, False)
    ]
    second = driver.step()
    assert [(s.seq_id, s.start_pos, s.token_ids) for s in second.slots] == [
        (1, 9, [19]),
        (2, 9, [19]),
        (3, 9, [19]),
    ]
    leader_last = seqs[0].block_table[2]
    assert second.block_copies == [
        (leader_last, seqs[1].block_table[2]),
        (leader_last, seqs[2].block_table[2]),
    ]
    assert seqs[1].block_table[:2] == seqs[2].block_table[:2] == seqs[0].block_table[:2]
    driver.run()
    for i, seq in enumerate(seqs):
        assert driver.outputs[seq.seq_id] == expected_stream(prompt, 4, seed=i)
    assert sum(b.num_tokens for b in driver.batches[:2]) == 9 + 3
    assert driver.scheduler.num_free_blocks == 32


def test_fork_at_a_block_boundary_copies_nothing() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    seqs = _group(1, list(range(9)), n=2)
    driver.scheduler.add_group(seqs)
    driver.step()
    second = driver.step()
    assert second.block_copies == [] and len(second.slots) == 2
    driver.run()
    assert driver.outputs[2] == expected_stream(list(range(9)), 4, seed=1)


def test_one_token_prompt_group_forks_without_prefill() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    seqs = _group(1, [7], n=4)
    driver.scheduler.add_group(seqs)
    driver.run()
    for i, seq in enumerate(seqs):
        assert driver.outputs[seq.seq_id] == expected_stream([7], 4, seed=i)


def test_group_reserves_its_slots_in_max_num_seqs() -> None:
    driver = Driver(SchedulerConfig(block_size=4, max_num_seqs=3), num_blocks=32)
    driver.scheduler.add_group(_group(1, list(range(6)), n=3))
    driver.scheduler.add(make_seq(9, [1, 2], max_tokens=2))
    driver.step()
    assert driver.scheduler.num_running == 1 and driver.scheduler.num_waiting == 1
    driver.run()
    assert driver.outputs[9] == expected_stream([2], 2)


def test_fork_waits_for_blocks_and_preempts_newer_sequences() -> None:
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=64)
    driver = Driver(config, num_blocks=6)
    scheduler = driver.scheduler
    scheduler.add_group(_group(1, list(range(7)), n=3, max_tokens=1))
    scheduler.add(make_seq(9, list(range(30, 45)), max_tokens=2))
    driver.step()  # leader: 6 tokens in 2 blocks; seq 9: 15 tokens in 4 blocks
    assert scheduler.num_free_blocks == 0
    second = driver.step()
    assert second.freed_seq_ids == [9] and len(second.block_copies) == 2
    driver.run()
    assert driver.outputs[9] == expected_stream(list(range(30, 45)), 2)
    assert [driver.outputs[i] for i in (1, 2, 3)] == [
        expected_stream(list(range(7)), 1, seed=i) for i in range(3)
    ]


def test_fork_holds_when_nothing_newer_can_be_preempted() -> None:
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=64)
    driver = Driver(config, num_blocks=6)
    scheduler = driver.scheduler
    scheduler.add(make_seq(9, list(range(30, 45)), max_tokens=2))
    scheduler.add_group(_group(1, list(range(7)), n=3, max_tokens=1))
    driver.step()  # seq 9: 4 blocks (older); leader: 2 blocks
    second = driver.step()
    # No block for the copies and only older sequences: the leader holds, 9 goes on.
    assert [s.seq_id for s in second.slots] == [9] and second.block_copies == []
    driver.run()
    assert driver.outputs[1] == expected_stream(list(range(7)), 1)


def test_abort_of_a_pending_sibling_releases_its_reservation() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    scheduler = driver.scheduler
    seqs = _group(1, list(range(6)), n=3)
    scheduler.add_group(seqs)
    driver.step()
    scheduler.abort(2)
    check_invariants(scheduler)
    assert seqs[0].pending_forks == [seqs[2]]
    driver.run()
    assert sorted(driver.outputs) == [1, 3]


def test_abort_of_a_waiting_pending_sibling() -> None:
    driver = Driver(SchedulerConfig(block_size=4, max_num_seqs=2), num_blocks=32)
    driver.scheduler.add(make_seq(9, [1], max_tokens=3))
    driver.scheduler.add_group(_group(1, [3, 4], n=2))
    driver.step()
    driver.scheduler.abort(2)
    driver.run()
    assert sorted(driver.outputs) == [1, 9]


def test_leader_leaving_before_the_fork_hands_the_prompt_to_a_sibling() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    scheduler = driver.scheduler
    prompt = list(range(12))
    seqs = _group(1, prompt, n=3)
    scheduler.add_group(seqs)
    driver.step()
    scheduler.abort(1)
    assert scheduler.num_free_blocks == 32 and scheduler.num_waiting == 1
    assert seqs[1].pending_forks == [seqs[2]]
    driver.run()
    assert sorted(driver.outputs) == [2, 3]
    assert driver.outputs[3] == expected_stream(prompt, 4, seed=2)


def test_abort_request_drops_the_whole_group_at_once() -> None:
    driver = Driver(SchedulerConfig(block_size=4), num_blocks=32)
    scheduler = driver.scheduler
    scheduler.add_group(_group(1, list(range(6)), n=3, max_tokens=50))
    driver.step()
    driver.step()
    assert scheduler.num_running == 3
    scheduler.abort_request("group")
    assert scheduler.num_free_blocks == 32 and not scheduler.has_work()
    assert scheduler.schedule().slots == []


def test_aborts_return_blocks_at_once_wherever_the_sequence_is() -> None:
    config = SchedulerConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=2)
    driver = Driver(config, num_blocks=64)
    scheduler = driver.scheduler
    scheduler.add(make_seq(1, [1, 2, 3], max_tokens=100))  # will be decoding
    scheduler.add(make_seq(2, list(range(100, 140)), max_tokens=5))  # mid-prefill
    scheduler.add(make_seq(3, [9, 9], max_tokens=5))  # waiting (max_num_seqs)
    driver.step()
    driver.step()
    seq2 = scheduler.get(2)
    assert seq2 is not None and 0 < seq2.num_computed_tokens < 40
    assert scheduler.get(3) is not None and scheduler.get(3).status is SeqStatus.WAITING  # type: ignore[union-attr]
    idle = scheduler.block_manager.num_blocks
    for seq_id in (3, 2, 1):
        scheduler.abort(seq_id)
    assert scheduler.num_free_blocks == idle and not scheduler.has_work()
    batch = scheduler.schedule()
    assert batch.slots == [] and scheduler.num_free_blocks == idle


def test_aborting_a_waiting_group_leader_first_leaves_nothing_behind() -> None:
    driver = Driver(SchedulerConfig(block_size=4, max_num_seqs=3), num_blocks=32)
    scheduler = driver.scheduler
    scheduler.add(make_seq(9, [1, 2, 3], max_tokens=30))
    seqs = _group(1, list(range(6)), n=3)
    scheduler.add_group(seqs)
    driver.step()
    assert scheduler.num_waiting == 1  # the group waits for three free slots
    for seq in seqs:  # the engine core's order: the leader first
        scheduler.abort(seq.seq_id)
    assert scheduler.num_waiting == 0 and all(s.is_finished for s in seqs)
    check_invariants(scheduler)
    driver.run()
    assert sorted(driver.outputs) == [9]
