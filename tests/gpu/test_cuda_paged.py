"""The paged runner and the LLM engine on CUDA: the same equivalence bars as on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gpu_device import DEVICE
from paged_helpers import GREEDY, generate_greedy, load_runner, random_prompts
from runtimes_helpers import make_spec
from transformers import AutoModelForCausalLM

from lmaas.core.messages import GenerateRequest, SamplingParams, SeqDelta
from lmaas.engine.llm.core import LLMEngine
from lmaas.runtimes.llm.batch import SeqSlot, StepBatch
from lmaas.testing.tiny_models import FAMILIES
from lmaas.worker.factory import create_runner

NEW_TOKENS = 64
PROMPT_LENGTHS = [5, 17, 1, 33, 9, 17]


def _hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=DEVICE)
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens
        )
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_on_cuda(tiny_lm_dirs: dict[str, Path], family: str) -> None:
    runner, _ = load_runner(tiny_lm_dirs[family], device=DEVICE, num_blocks=96)
    assert runner.device.type == DEVICE
    prompts = random_prompts(PROMPT_LENGTHS, runner.config.vocab_size)
    expected = _hf_greedy(tiny_lm_dirs[family], prompts, NEW_TOKENS)
    assert generate_greedy(runner, prompts, NEW_TOKENS, num_blocks=96) == expected
    chunked = generate_greedy(
        runner, prompts, NEW_TOKENS, chunk_size=4, shuffle_blocks=True, num_blocks=96
    )
    assert chunked == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_match_fp32_on_cuda(
    tiny_lm_dirs: dict[str, Path], dtype: str
) -> None:
    model_dir = tiny_lm_dirs["llama"]
    runner, _ = load_runner(model_dir, dtype=dtype, device=DEVICE)
    prompts = random_prompts([12, 7, 20], runner.config.vocab_size, seed=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    tables = [[0, 1, 2], [3, 4], [5, 6, 7]]
    slots = [SeqSlot(i, p, 0, tables[i], True, GREEDY) for i, p in enumerate(prompts)]
    prefill = runner.compute_logits(StepBatch(slots))
    nexts = prefill.argmax(-1).tolist()
    decode = runner.compute_logits(
        StepBatch(
            [SeqSlot(i, [nexts[i]], len(p), tables[i], True, GREEDY) for i, p in enumerate(prompts)]
        )
    )
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            ids = torch.tensor([[*prompt, nexts[i]]], device=DEVICE)
            ref = model(ids).logits[0, -2:].float()
        ours = torch.stack((prefill[i], decode[i]))
        diff = (torch.log_softmax(ours, -1) - torch.log_softmax(ref, -1)).abs().max()
        assert diff < 0.1


def _engine(model_dir: Path, **options: str) -> LLMEngine:
    spec = make_spec(model_dir, dtype="float32", device=DEVICE, max_batch_size=8, options=options)
    engine = create_runner(spec)
    assert isinstance(engine, LLMEngine)
    engine.load()
    engine.warmup()
    return engine


def _run(engine: LLMEngine, requests: list[GenerateRequest]) -> dict[tuple[str, int], str]:
    for request in requests:
        engine.add_request(request)
    texts: dict[tuple[str, int], list[SeqDelta]] = {}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for delta in engine.step():
            texts.setdefault((delta.request_id, delta.index), []).append(delta)
    assert not engine.has_work()
    for deltas in texts.values():
        assert deltas[-1].finish_reason is not None
    return {key: "".join(d.text for d in deltas) for key, deltas in texts.items()}


def test_engine_seeded_sampling_is_independent_of_neighbours(
    tiny_lm_dirs: dict[str, Path],
) -> None:
    engine = _engine(tiny_lm_dirs["qwen2"])
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = _run(engine, [GenerateRequest("a", seeded, prompt="hello world")])
    noisy = SamplingParams(max_tokens=30, temperature=1.2, min_p=0.05)
    crowd = [GenerateRequest(f"n{i}", noisy, prompt="x" * (i + 1)) for i in range(5)]
    together = _run(engine, [*crowd, GenerateRequest("a", seeded, prompt="hello world")])
    assert together[("a", 0)] == alone[("a", 0)]


def test_engine_n_logprobs_penalties_and_json_on_cuda(tiny_lm_dirs: dict[str, Path]) -> None:
    engine = _engine(tiny_lm_dirs["llama"])
    fancy = SamplingParams(
        max_tokens=16,
        temperature=0.8,
        seed=3,
        n=3,
        logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        logit_bias={5: 2.0},
    )
    schema = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    guided = SamplingParams(max_tokens=64, temperature=1.0, seed=1, response_format=fmt)
    out = _run(
        engine,
        [
            GenerateRequest("fancy", fancy, prompt="the quick brown fox"),
            GenerateRequest("json", guided, prompt="give me json"),
        ],
    )
    assert {key for key in out if key[0] == "fancy"} == {("fancy", i) for i in range(3)}
    assert isinstance(json.loads(out[("json", 0)])["a"], bool)


def test_compiled_stages_match_transformers_on_cuda(tiny_lm_dirs: dict[str, Path]) -> None:
    """``compile=on`` (inductor; triton kernels on CUDA) keeps fp32 greedy token-identical."""
    if DEVICE == "cuda":
        pytest.importorskip("triton", reason="torch inductor on CUDA needs triton")
    model_dir = tiny_lm_dirs["qwen3"]  # every stage, per-head q/k norm included
    runner, _ = load_runner(model_dir, device=DEVICE, num_blocks=96, options={"compile": "on"})
    assert runner.compiled
    prompts = random_prompts(PROMPT_LENGTHS, runner.config.vocab_size, seed=2)
    expected = _hf_greedy(model_dir, prompts, 24)
    got = generate_greedy(runner, prompts, 24, chunk_size=8, shuffle_blocks=True, num_blocks=96)
    assert got == expected
