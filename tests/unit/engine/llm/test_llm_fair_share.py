"""Weighted fair share between tenants in the LLM scheduler, driven with the FakeModelRunner."""

from __future__ import annotations

from lmaas.core.messages import GenerateRequest, ModelInfo, SamplingParams
from lmaas.engine.llm.core import EngineConfig, LLMEngine
from lmaas.engine.llm.protocol import PromptProcessor
from lmaas.engine.llm.scheduler import SchedulerConfig
from lmaas.engine.llm.sequence import SchedSequence, SeqStatus
from lmaas.testing.llm_fakes import FakeModelRunner, FakePromptProcessor
from tests.unit.engine.llm.llm_sched_helpers import Driver, make_seq

CONFIG = SchedulerConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_waiting=512)


def _seq(seq_id: int, tenant: str, weight: float = 1.0, max_tokens: int = 16) -> SchedSequence:
    seq = make_seq(seq_id, [1 + seq_id % 7] * 8, max_tokens, namespace=tenant)
    seq.tenant, seq.weight = tenant, weight
    return seq


def _admitted(driver: Driver, seqs: list[SchedSequence]) -> int:
    return sum(seq.status is not SeqStatus.WAITING for seq in seqs)


def test_a_flooding_tenant_cannot_starve_a_late_one() -> None:
    driver = Driver(CONFIG, num_blocks=256)
    flood = [_seq(i, "a") for i in range(100)]
    for seq in flood:
        driver.scheduler.add(seq)
    for _ in range(3):
        driver.step()
    late = [_seq(1000 + i, "b") for i in range(5)]
    for seq in late:
        driver.scheduler.add(seq)
    flood_before = _admitted(driver, flood)
    steps = 0
    while _admitted(driver, late) < len(late):
        driver.step()
        steps += 1
        assert steps < 200, "tenant b starved"
    # equal weights: b gets about every other free slot (a no more than one wave more than b),
    # so the wait is a few sequence lifetimes (17 steps each), not the 100-request backlog
    # (FIFO: ~25 waves, 400+ steps)
    assert _admitted(driver, flood) - flood_before <= len(late) + CONFIG.max_num_seqs
    assert steps <= 4 * 17, steps
    driver.run(max_steps=2000)
    assert sorted(driver.finished) == sorted(s.seq_id for s in flood + late)


def test_one_tenant_alone_is_first_come_first_served() -> None:
    driver = Driver(CONFIG, num_blocks=256)
    seqs = [_seq(i, "a") for i in range(12)]
    for seq in seqs:
        driver.scheduler.add(seq)
    driver.run(max_steps=500)
    assert driver.finished == [s.seq_id for s in seqs]


def test_weights_three_to_one_give_about_three_to_one_service() -> None:
    driver = Driver(CONFIG, num_blocks=256)
    heavy = [_seq(i, "gold", weight=3.0) for i in range(200)]
    light = [_seq(1000 + i, "bronze", weight=1.0) for i in range(200)]
    for a, b in zip(heavy, light, strict=True):
        driver.scheduler.add(b)  # bronze first in the queue: FIFO would favour it
        driver.scheduler.add(a)
    for _ in range(400):  # both stay backlogged throughout
        driver.step()
    gold = sum(s.num_computed_tokens + len(s.output_ids) for s in heavy)
    bronze = sum(s.num_computed_tokens + len(s.output_ids) for s in light)
    assert _admitted(driver, heavy) < len(heavy) and _admitted(driver, light) < len(light)
    assert 2.5 <= gold / bronze <= 3.5, (gold, bronze)


def test_an_idle_tenant_banks_no_credit() -> None:
    """A tenant that comes back after a pause starts level with the others, not far behind."""
    driver = Driver(CONFIG, num_blocks=256)
    early = _seq(0, "b")
    driver.scheduler.add(early)
    driver.run()
    flood = [_seq(1 + i, "a") for i in range(40)]
    for seq in flood:
        driver.scheduler.add(seq)
    for _ in range(100):
        driver.step()
    back = [_seq(500 + i, "b") for i in range(12)]
    for seq in back:
        driver.scheduler.add(seq)
    for _ in range(34):  # two sequence lifetimes
        driver.step()
    # b shares the slots with a (it does not take them all for its earlier idle time)
    assert 0 < _admitted(driver, back) < len(back)


def test_the_engine_core_schedules_by_the_requests_tenant() -> None:
    runner = FakeModelRunner(vocab_size=1000, num_blocks=64, context_length=512)

    def make_prompts(info: ModelInfo) -> PromptProcessor:
        return FakePromptProcessor(vocab_size=info.vocab_size or 1000)

    engine = LLMEngine(runner, make_prompts, EngineConfig(scheduler=CONFIG))
    engine.load()
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request(
        GenerateRequest("r1", sampling, prompt="a b", tenant="search", tenant_weight=2.0)
    )
    seqs = list(engine._scheduler._seqs.values())  # type: ignore[attr-defined]
    assert [(s.tenant, s.weight) for s in seqs] == [("search", 2.0)]
