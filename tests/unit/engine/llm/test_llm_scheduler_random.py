"""Randomized: arrivals, groups, shared prefixes, aborts and tight caches over hundreds of steps.

Invariants are checked after every step (``Driver.step``); the fake runner checks the step
contract and that each sequence's cache holds its history. Every finished sequence must carry
exactly the tokens it would have produced alone, preemptions and prefix hits notwithstanding.
"""

from __future__ import annotations

import random

import pytest
from llm_sched_helpers import Driver, expected_stream, make_seq

from lmaas.core.errors import OverloadedError
from lmaas.engine.llm.scheduler import SchedulerConfig
from lmaas.engine.llm.sequence import SchedSequence

_SYSTEM_PROMPTS = [[900 + i for i in range(n)] for n in (5, 11, 17)]


def _random_config(rng: random.Random) -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=rng.choice([2, 4, 8]),
        max_num_batched_tokens=rng.choice([3, 8, 16, 64]),
        max_waiting=rng.choice([4, 64]),
        block_size=rng.choice([1, 2, 4, 8]),
        enable_prefix_caching=rng.random() < 0.8,
        max_chunk_tokens=rng.choice([None, None, 5]),
    )


def _random_group(
    rng: random.Random, first_id: int, request: str, max_n: int
) -> list[SchedSequence]:
    prompt = rng.choice(_SYSTEM_PROMPTS) if rng.random() < 0.6 else []
    prompt = prompt + [rng.randrange(1, 800) for _ in range(rng.randint(1, 12))]
    n = 1 if rng.random() < 0.75 else rng.randint(2, min(3, max_n))
    namespace = rng.choice(["", "", "tenant-b"])
    max_tokens = rng.randint(1, 12)
    return [
        make_seq(first_id + i, prompt, max_tokens, request_id=request, namespace=namespace, seed=i)
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_keeps_invariants_and_token_streams(seed: int) -> None:
    rng = random.Random(seed)
    config = _random_config(rng)
    longest = max(len(p) for p in _SYSTEM_PROMPTS) + 12 + 12
    num_blocks = -(-longest // config.block_size) + rng.randint(0, 6)
    driver = Driver(config, num_blocks)
    scheduler = driver.scheduler
    seqs: dict[int, SchedSequence] = {}
    aborted: set[int] = set()
    next_id = 1
    for step in range(300):
        if step < 240 and rng.random() < 0.5:
            group = _random_group(rng, next_id, f"r{next_id}", config.max_num_seqs)
            next_id += len(group)
            try:
                scheduler.add_group(group) if len(group) > 1 else scheduler.add(group[0])
            except OverloadedError:
                pass
            else:
                seqs.update((s.seq_id, s) for s in group)
        live = [i for i in seqs if i not in aborted and i not in driver.finished]
        if live and rng.random() < 0.08:
            victim = seqs[rng.choice(live)]
            if rng.random() < 0.5:
                scheduler.abort(victim.seq_id)
                aborted.add(victim.seq_id)
            else:
                scheduler.abort_request(victim.request_id)
                aborted.update(s for s in live if seqs[s].request_id == victim.request_id)
        driver.step()
    driver.run(max_steps=2000)
    assert scheduler.num_free_blocks == num_blocks and not scheduler.has_work()
    assert set(driver.finished) | aborted == set(seqs)
    for seq_id, seq in seqs.items():
        want = expected_stream(seq.prompt_ids, seq.max_tokens, seed=seq.sampling.seed or 0)
        got = driver.outputs.get(seq_id, [])
        assert got == (want if seq_id in driver.finished else want[: len(got)])
