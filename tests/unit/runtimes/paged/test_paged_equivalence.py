"""The paged runner decodes exactly like HF transformers (fp32) and closely in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paged_helpers import (
    GREEDY,
    GreedySampler,
    generate_greedy,
    load_runner,
    random_prompts,
)
from runtimes_helpers import make_spec
from transformers import AutoModelForCausalLM

from lmaas.runtimes.llm.batch import SeqSlot, StepBatch
from lmaas.runtimes.llm.paged import PagedModelRunner
from lmaas.testing.tiny_models import FAMILIES

NEW_TOKENS = 64
PROMPT_LENGTHS = [5, 17, 1, 33, 9, 17]
"""Different lengths, one single-token prompt, and two of equal length (stacked prefill)."""


def _hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # the step loop ignores eos
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens
        )
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(tiny_lm_dirs: dict[str, Path], family: str) -> None:
    runner, sampler = load_runner(tiny_lm_dirs[family], num_blocks=96)
    prompts = random_prompts(PROMPT_LENGTHS, runner.config.vocab_size)
    expected = _hf_greedy(tiny_lm_dirs[family], prompts, NEW_TOKENS)

    packed = generate_greedy(runner, prompts, NEW_TOKENS, num_blocks=96)
    assert packed == expected
    # Chunked prefill mixes prefill chunks with decodes in one step; shuffled blocks make every
    # block table non-contiguous.
    chunked = generate_greedy(
        runner, prompts, NEW_TOKENS, chunk_size=4, shuffle_blocks=True, num_blocks=96
    )
    assert chunked == expected
    assert sorted(sampler.freed) == sorted(2 * list(range(len(prompts))))


def test_gather_path_without_decode_view_matches(tiny_lm_dirs: dict[str, Path]) -> None:
    runner, _ = load_runner(tiny_lm_dirs["qwen3"], num_blocks=96, decode_view_bytes=0)
    prompts = random_prompts(PROMPT_LENGTHS, runner.config.vocab_size, seed=1)
    expected = _hf_greedy(tiny_lm_dirs["qwen3"], prompts, 24)
    got = generate_greedy(runner, prompts, 24, chunk_size=8, shuffle_blocks=True, num_blocks=96)
    assert got == expected


def test_bf16_logits_match_fp32_transformers(tiny_lm_dirs: dict[str, Path]) -> None:
    model_dir = tiny_lm_dirs["llama"]
    runner, _ = load_runner(model_dir, dtype="bfloat16")
    assert runner.dtype == torch.bfloat16
    prompts = random_prompts([12, 7, 20], runner.config.vocab_size, seed=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tables = [[0, 1, 2], [3, 4], [5, 6, 7]]
    # Prefill step (last-token logits), then one decode step feeding the argmax back.
    slots = [SeqSlot(i, p, 0, tables[i], True, GREEDY) for i, p in enumerate(prompts)]
    prefill = runner.compute_logits(StepBatch(slots))
    nexts = prefill.argmax(-1).tolist()
    decode_slots = [
        SeqSlot(i, [nexts[i]], len(p), tables[i], True, GREEDY) for i, p in enumerate(prompts)
    ]
    decode = runner.compute_logits(StepBatch(decode_slots))
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            ref = model(torch.tensor([[*prompt, nexts[i]]])).logits[0, -2:].float()
        ours = torch.stack((prefill[i], decode[i]))
        diff = (torch.log_softmax(ours, -1) - torch.log_softmax(ref, -1)).abs().max()
        assert diff < 0.1
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


def test_fork_with_block_copies_matches_the_parent(tiny_lm_dirs: dict[str, Path]) -> None:
    runner, _ = load_runner(tiny_lm_dirs["qwen2"], block_size=8, num_blocks=64)
    prompt = random_prompts([20], runner.config.vocab_size, seed=5)[0]
    expected = _hf_greedy(tiny_lm_dirs["qwen2"], [prompt], 6)[0]
    parent, child = [9, 4, 17], [9, 4, 23]  # shares two full blocks, copies the partial third
    first = runner.execute(StepBatch([SeqSlot(0, prompt, 0, parent, True, GREEDY)]))[0].token_id
    outputs: dict[int, list[int]] = {0: [first], 1: [first]}
    copies = [(17, 23)]
    for step in range(5):
        pos = len(prompt) + step
        if pos == 24:  # both sequences enter a fourth block
            parent.append(2)
            child.append(30)
        slots = [
            SeqSlot(seq, [outputs[seq][-1]], pos, list(table), True, GREEDY)
            for seq, table in ((0, parent), (1, child))
        ]
        results = runner.execute(StepBatch(slots, block_copies=copies))
        copies = []
        for seq, sampled in enumerate(results):
            outputs[seq].append(sampled.token_id)
    assert outputs[0] == expected
    assert outputs[1] == expected


def test_fork_without_the_copy_diverges(tiny_lm_dirs: dict[str, Path]) -> None:
    """The copy is what makes the child right: an empty third block changes its logits."""
    runner, _ = load_runner(tiny_lm_dirs["qwen2"], block_size=8, num_blocks=64)
    prompt = random_prompts([20], runner.config.vocab_size, seed=5)[0]
    runner.execute(StepBatch([SeqSlot(0, prompt, 0, [9, 4, 17], True, GREEDY)]))
    slots = [SeqSlot(s, [7], 20, t, True, GREEDY) for s, t in ((0, [9, 4, 17]), (1, [9, 4, 23]))]
    logits = runner.compute_logits(StepBatch(slots))
    assert not torch.allclose(logits[0], logits[1])
    copied = runner.compute_logits(StepBatch(slots, block_copies=[(17, 23)]))
    torch.testing.assert_close(copied[0], copied[1])


def test_only_sampling_slots_get_results(tiny_lm_dirs: dict[str, Path]) -> None:
    runner, sampler = load_runner(tiny_lm_dirs["llama"])
    slots = [
        SeqSlot(0, [5, 6, 7, 8], 0, [0], False, GREEDY),
        SeqSlot(1, [9, 10], 0, [1], True, GREEDY),
    ]
    assert len(runner.execute(StepBatch(slots, freed_seq_ids=[42]))) == 1
    assert sampler.freed == [42]
    assert runner.execute(StepBatch([slots[0]])) == []
    assert runner.execute(StepBatch([], block_copies=[(0, 3)])) == []
    assert isinstance(sampler, GreedySampler)


def test_default_sampler_decodes_like_argmax(tiny_lm_dirs: dict[str, Path]) -> None:
    runner = PagedModelRunner(make_spec(tiny_lm_dirs["mistral"]))  # the engine's Sampler
    runner.load()
    runner.allocate_kv_cache(1 << 22, 8)
    reference, _ = load_runner(tiny_lm_dirs["mistral"])
    prompts = random_prompts([6, 11], runner.config.vocab_size, seed=2)
    assert generate_greedy(runner, prompts, 12) == generate_greedy(reference, prompts, 12)
