"""LLMEngine over the fake runner: the step loop, text, limits, n > 1, aborts, guides."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from lmaas.core.errors import InvalidRequestError, OverloadedError
from lmaas.core.messages import GenerateRequest, ModelInfo, SamplingParams, SeqDelta
from lmaas.engine.llm.core import EngineConfig, LLMEngine
from lmaas.engine.llm.protocol import PromptProcessor
from lmaas.engine.llm.scheduler import SchedulerConfig
from lmaas.runtimes.llm.batch import TokenGuide
from lmaas.testing.llm_fakes import FakeModelRunner, FakePromptProcessor


def _engine(
    runner: FakeModelRunner | None = None, guide: TokenGuide | None = None, **limits: int
) -> tuple[LLMEngine, FakeModelRunner]:
    runner = runner or FakeModelRunner(vocab_size=1000, num_blocks=64, context_length=512)
    config = SchedulerConfig(**{"block_size": 4, "max_num_batched_tokens": 64, **limits})

    def make_prompts(info: ModelInfo) -> PromptProcessor:
        return FakePromptProcessor(vocab_size=info.vocab_size or 1000)

    def make_guides(prompts: PromptProcessor) -> object:
        return lambda response_format: guide

    engine = LLMEngine(
        runner,
        make_prompts,
        EngineConfig(scheduler=config),
        make_guide=make_guides,  # type: ignore[arg-type]
    )
    engine.load()
    return engine, runner


def _request(
    request_id: str, prompt: str, max_tokens: int = 8, **sampling: object
) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    return GenerateRequest(request_id, params, prompt=prompt)


def _drain(engine: LLMEngine, max_steps: int = 10_000) -> list[SeqDelta]:
    deltas: list[SeqDelta] = []
    for _ in range(max_steps):
        if not engine.has_work():
            return deltas
        deltas.extend(engine.step())
    raise AssertionError("the engine did not finish")


def _texts(deltas: list[SeqDelta]) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for delta in deltas:
        key = (delta.request_id, delta.index)
        out[key] = out.get(key, "") + delta.text
    return out


def test_one_request_streams_its_tokens_then_finishes_by_length() -> None:
    engine, _ = _engine()
    engine.add_request(_request("r1", "w10 w11 w12", max_tokens=5))
    deltas = _drain(engine)
    assert "".join(d.text for d in deltas).split() == ["w13", "w14", "w15", "w16", "w17"]
    assert deltas[0].prompt_tokens == 3
    assert sum(d.prompt_tokens for d in deltas) == 3
    assert sum(d.num_new_tokens for d in deltas) == 5
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert engine.stats()["kv_free_blocks"] == engine.stats()["kv_total_blocks"]


def test_requests_join_and_leave_and_each_gets_its_solo_output() -> None:
    rng = random.Random(0)
    prompts = {
        f"r{i}": " ".join(f"w{rng.randrange(1, 900)}" for _ in range(rng.randrange(1, 40)))
        for i in range(30)
    }
    lengths = {rid: rng.randrange(1, 20) for rid in prompts}
    solo: dict[str, str] = {}
    for rid, prompt in prompts.items():
        engine, _ = _engine()
        engine.add_request(_request(rid, prompt, lengths[rid]))
        solo[rid] = "".join(d.text for d in _drain(engine))
    engine, runner = _engine(max_num_seqs=8)
    pending = list(prompts)
    deltas: list[SeqDelta] = []
    while pending or engine.has_work():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                rid = pending.pop()
                engine.add_request(_request(rid, prompts[rid], lengths[rid]))
        deltas.extend(engine.step())
    got = _texts(deltas)
    assert {rid: got[(rid, 0)] for rid in prompts} == solo
    assert max(len(step.slots) for step in runner.steps) <= 8
    assert engine.stats()["kv_free_blocks"] == engine.stats()["kv_total_blocks"]


def test_abort_frees_blocks_at_once() -> None:
    engine, _ = _engine()
    idle = engine.stats()["kv_free_blocks"]
    engine.add_request(_request("r1", " ".join(["w5"] * 30), max_tokens=100))
    engine.add_request(_request("r2", "w1 w2", max_tokens=3))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_free_blocks"] < idle
    engine.abort("r1")
    deltas = _drain(engine)
    assert all(d.request_id == "r2" for d in deltas)
    assert engine.stats()["kv_free_blocks"] == idle
    engine.abort("unknown")  # ignored


def test_n_choices_share_the_prompt_and_count_it_once() -> None:
    engine, runner = _engine()
    engine.add_request(_request("r1", "w1 w2 w3 w4 w5 w6", max_tokens=4, n=3, seed=10))
    deltas = _drain(engine)
    texts = _texts(deltas)
    assert sorted(texts) == [("r1", 0), ("r1", 1), ("r1", 2)]
    assert len(set(texts.values())) == 3  # seeds 10, 11, 12 give different streams
    assert sum(d.prompt_tokens for d in deltas) == 6
    assert sum(1 for d in deltas if d.finish_reason) == 3
    prefill_tokens = sum(s.num_tokens for s in runner.steps[:1])
    assert prefill_tokens == 5  # the shared prompt minus its last token, computed once


def test_limits_are_refused_with_clear_errors() -> None:
    engine, _ = _engine(runner=FakeModelRunner(context_length=16), max_waiting=1, max_num_seqs=1)
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.add_request(_request("big", " ".join(["w3"] * 10), max_tokens=10))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(_request("empty", ""))
    with pytest.raises(InvalidRequestError, match="seq2seq models only") as beams:
        engine.add_request(_request("beams", "w1", num_beams=2))
    assert beams.value.param == "num_beams"
    engine.add_request(_request("a", "w1", max_tokens=4))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        engine.add_request(_request("a", "w1"))
    engine.step()  # a is running, the waiting queue is empty again
    engine.add_request(_request("b", "w1", max_tokens=4))
    with pytest.raises(OverloadedError):
        engine.add_request(_request("c", "w1", max_tokens=4))


def test_stop_strings_and_min_tokens_go_through_the_text_layer() -> None:
    engine, _ = _engine()
    engine.add_request(_request("r1", "w1", max_tokens=20, stop=["w5"]))
    deltas = _drain(engine)
    assert "".join(d.text for d in deltas).split() == ["w2", "w3", "w4"]
    assert deltas[-1].finish_reason == "stop"


@dataclass
class _CountingGuide:
    limit: int
    seen: int = 0

    def allowed_token_ids(self) -> list[int] | None:
        return None

    def accept(self, token_id: int) -> None:
        self.seen += 1

    def is_finished(self) -> bool:
        return self.seen >= self.limit


def test_a_finished_guide_stops_the_sequence() -> None:
    guide = _CountingGuide(limit=3)
    engine, _ = _engine(guide=guide)
    engine.add_request(
        _request("r1", "w1", max_tokens=20, response_format='{"type":"json_object"}')
    )
    deltas = _drain(engine)
    assert sum(d.num_new_tokens for d in deltas) == 3
    assert deltas[-1].finish_reason == "stop"


def test_logprobs_are_attached_when_asked() -> None:
    engine, _ = _engine()
    engine.add_request(_request("r1", "w1", max_tokens=2, logprobs=0))
    deltas = _drain(engine)
    assert all(d.logprobs is not None and d.logprobs[0].token.startswith("w") for d in deltas)


def test_warmup_leaves_the_engine_idle() -> None:
    engine, _ = _engine()
    engine.warmup()
    assert not engine.has_work()
    assert engine.num_running() == 0
    assert engine.health()
