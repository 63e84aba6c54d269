"""The fake runner catches broken step contracts; the fake prompt processor tokenizes."""

from __future__ import annotations

import pytest

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import ChatMessage, GenerateRequest, SamplingParams
from lmaas.runtimes.llm.batch import SamplingConfig, SeqSlot, StepBatch
from lmaas.runtimes.llm.detokenize import IncrementalDetokenizer
from lmaas.testing.llm_fakes import FakeModelRunner, FakePromptProcessor, StepContractError


def _slot(
    seq_id: int, history: list[int], start: int, num: int, table: list[int], **kwargs: object
) -> SeqSlot:
    end = start + num
    return SeqSlot(
        seq_id=seq_id,
        token_ids=history[start:end],
        start_pos=start,
        block_table=table,
        sample=end == len(history),
        sampling=SamplingConfig(),
        history=history,
        **kwargs,  # type: ignore[arg-type]
    )


class _OnlyEven:
    def allowed_token_ids(self) -> list[int] | None:
        return [2, 4, 6]

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool:
        return False


def test_load_and_allocate() -> None:
    runner = FakeModelRunner(vocab_size=50, num_blocks=3, context_length=99)
    info = runner.load()
    assert (info.context_length, info.vocab_size) == (99, 50)
    layout = runner.allocate_kv_cache(None, 8)
    assert (layout.block_size, layout.num_blocks) == (8, 3)
    layout = runner.allocate_kv_cache(8 * 64 * 5, 8)
    assert layout.num_blocks == 5 and layout.bytes_per_block == 8 * 64
    with pytest.raises(ModelLoadError):
        runner.allocate_kv_cache(10, 8)


def test_runs_a_valid_batch_and_records_it() -> None:
    runner = FakeModelRunner(vocab_size=10, num_blocks=4, block_size=2)
    history = [1, 2, 3]
    out = runner.execute(StepBatch([_slot(1, history, 0, 3, [0, 1])]))
    assert [s.token_id for s in out] == [4]
    history.append(4)
    banned = _slot(1, history, 3, 1, [0, 1], banned_token_ids=frozenset({5, 6}))
    assert [s.token_id for s in runner.execute(StepBatch([banned]))] == [7]
    history.append(7)
    guided = _slot(1, history, 4, 1, [0, 1, 2], guide=_OnlyEven())
    assert [s.token_id for s in runner.execute(StepBatch([guided]))] == [2]
    assert runner.steps[0].num_tokens == 3 and runner.steps[2].slots[0].block_table == (0, 1, 2)


def test_custom_next_token() -> None:
    runner = FakeModelRunner(num_blocks=2, block_size=4, next_token=lambda ctx, slot: len(ctx))
    assert runner.execute(StepBatch([_slot(1, [5, 5, 5], 0, 3, [0])]))[0].token_id == 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda h: [_slot(1, h, 0, 4, [0, 1]), _slot(1, h, 0, 4, [2, 3])], "twice"),
        (lambda h: [_slot(1, h, 0, 0, [])], "no tokens"),
        (lambda h: [_slot(1, h, 0, 4, [0])], "1 blocks"),
        (lambda h: [_slot(1, h, 0, 4, [0, 9])], "out of range"),
        (lambda h: [_slot(1, h, 2, 2, [0, 1])], "does not hold its history"),
        (lambda h: [_slot(1, h, 0, 2, [0]), _slot(2, h, 0, 2, [0])], "shared with"),
        (lambda h: [_slot(1, h, 0, 4, [0, 1]), _slot(2, h, 0, 4, [2, 3])], "tokens > budget"),
    ],
)
def test_contract_violations_fail_the_step(make: object, message: str) -> None:
    runner = FakeModelRunner(num_blocks=4, block_size=2, max_num_batched_tokens=6)
    with pytest.raises(StepContractError, match=message):
        runner.execute(StepBatch(make([1, 2, 3, 4])))  # type: ignore[operator]


def test_slot_checks() -> None:
    runner = FakeModelRunner(num_blocks=4, block_size=2, max_num_seqs=1)
    history = [1, 2, 3, 4]
    with pytest.raises(StepContractError, match="max_num_seqs"):
        runner.execute(StepBatch([_slot(1, history, 0, 2, [0]), _slot(2, history, 0, 2, [1])]))
    wrong_tokens = _slot(1, history, 0, 2, [0])
    wrong_tokens.token_ids = [7, 7]
    with pytest.raises(StepContractError, match="not the history"):
        runner.execute(StepBatch([wrong_tokens]))
    wrong_sample = _slot(1, history, 0, 2, [0])
    wrong_sample.sample = True
    with pytest.raises(StepContractError, match="sample=True"):
        runner.execute(StepBatch([wrong_sample]))
    runner.execute(StepBatch([_slot(1, history, 0, 2, [0])]))
    with pytest.raises(StepContractError, match="2 tokens were computed"):
        runner.execute(StepBatch([_slot(1, history, 3, 1, [0, 1])]))
    # Once freed, the sequence may start over (a preempted sequence is recomputed).
    runner.execute(StepBatch([_slot(1, history, 0, 4, [2, 3])], freed_seq_ids=[1]))


def test_block_copies_are_applied_before_reading() -> None:
    runner = FakeModelRunner(num_blocks=4, block_size=4)
    parent = [1, 2, 3, 4, 5, 6]
    runner.execute(StepBatch([_slot(1, parent, 0, 5, [0, 1])]))
    child = [1, 2, 3, 4, 5, 6]
    batch = StepBatch([_slot(2, child, 5, 1, [0, 2])], block_copies=[(1, 2)])
    assert [s.token_id for s in runner.execute(batch)] == [7]


def test_prompt_processor_tokenizes_and_decodes() -> None:
    prompts = FakePromptProcessor(vocab_size=100, eos_token_ids=frozenset({0}))
    assert prompts.eos_token_ids == frozenset({0})
    request = GenerateRequest("r", SamplingParams(), prompt="w5 w17 hello")
    ids = prompts.prompt_ids(request)
    assert ids[:2] == [5, 17] and 0 < ids[2] < 100
    chat = GenerateRequest("r", SamplingParams(), messages=[ChatMessage("user", "w3")])
    assert prompts.prompt_ids(chat)[-1] == 3
    assert prompts.prompt_ids(GenerateRequest("r", SamplingParams(), prompt_token_ids=[4])) == [4]
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        prompts.prompt_ids(GenerateRequest("r", SamplingParams(), prompt_token_ids=[100]))
    with pytest.raises(InvalidRequestError, match="empty"):
        prompts.prompt_ids(GenerateRequest("r", SamplingParams(), prompt="  "))
    assert prompts.token_text(9) == "w9"
    assert prompts.decoder.decode([1, 0, 2]) == "w1 w2"
    assert prompts.decoder.decode([1, 0], skip_special_tokens=False) == "w1 w0"
    detok = IncrementalDetokenizer(prompts.decoder, [5])
    assert detok.push(6) + detok.push(7) == " w6 w7"


def test_unknown_words_never_map_to_eos() -> None:
    prompts = FakePromptProcessor(vocab_size=2, eos_token_ids=frozenset({0, 1}) - {1})
    assert all(
        prompts.prompt_ids(GenerateRequest("r", SamplingParams(), prompt=w)) == [1]
        for w in "abcdefgh"
    )
