"""TorchCausalLMRunner on tiny random-weight decoders (fp32, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from runtimes_helpers import make_spec, run_to_completion
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ChatMessage, GenerateRequest, SamplingParams
from lmaas.runtimes.llm.torch import TorchCausalLMRunner
from lmaas.testing.tiny_models import FAMILIES

PROMPTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then the",
    "Numbers like 1, 2, 3, 42 and 2026 appear in text all the time. Prices rose by",
)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _request(request_id: str, prompt: str, sampling: SamplingParams = GREEDY) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, sampling=sampling, prompt=prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(tiny_lm_dirs: dict[str, Path], family: str) -> None:
    model_dir = tiny_lm_dirs[family]
    runner = TorchCausalLMRunner(make_spec(model_dir))
    info = runner.load()
    assert (info.context_length, info.dtype, info.device) == (512, "float32", "cpu")
    for i, prompt in enumerate(PROMPTS):
        runner.add_request(_request(str(i), prompt))
    outputs = run_to_completion(runner)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # the runner was told ignore_eos
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer.encode(prompt)])
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24
        )[0, ids.shape[1] :].tolist()
        assert outputs.token_ids(str(i)) == expected
        assert outputs.text(str(i)) == tokenizer.decode(expected, skip_special_tokens=True)
        deltas = outputs.deltas[str(i)]
        assert deltas[0].prompt_tokens == ids.shape[1]
        assert all(d.prompt_tokens == 0 for d in deltas[1:])
        assert sum(d.num_new_tokens for d in deltas) == 24
        assert [d.finish_reason for d in deltas] == [None] * 23 + ["length"]


def test_seeded_sampling_is_reproducible_whatever_the_batch(
    llama_runner: TorchCausalLMRunner,
) -> None:
    sampling = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    llama_runner.add_request(_request("alone", PROMPTS[1], sampling))
    alone = run_to_completion(llama_runner)

    llama_runner.add_request(_request("n1", PROMPTS[0], SamplingParams(max_tokens=8, seed=5)))
    llama_runner.add_request(_request("crowded", PROMPTS[1], sampling))
    llama_runner.add_request(_request("n2", PROMPTS[2], SamplingParams(max_tokens=20)))
    crowded = run_to_completion(llama_runner)
    assert crowded.token_ids("crowded") == alone.token_ids("alone")
    assert crowded.text("crowded") == alone.text("alone")

    other_seed = SamplingParams(max_tokens=16, temperature=1.0, seed=99)
    llama_runner.add_request(_request("other", PROMPTS[1], other_seed))
    assert run_to_completion(llama_runner).token_ids("other") != alone.token_ids("alone")


def test_max_tokens_finishes_with_length(llama_runner: TorchCausalLMRunner) -> None:
    sampling = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    llama_runner.add_request(_request("r", "Hello", sampling))
    deltas = run_to_completion(llama_runner).deltas["r"]
    assert [d.num_new_tokens for d in deltas] == [1] * 5
    assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]


def test_context_overflow_is_refused_quoting_the_numbers(
    llama_runner: TorchCausalLMRunner,
) -> None:
    ids = [7] * 500
    with pytest.raises(InvalidRequestError) as excinfo:
        llama_runner.add_request(
            GenerateRequest("r", SamplingParams(max_tokens=100), prompt_token_ids=ids)
        )
    assert excinfo.value.param == "max_tokens"
    assert all(str(n) in excinfo.value.message for n in (512, 600, 500, 100))
    with pytest.raises(InvalidRequestError) as excinfo:
        llama_runner.add_request(GenerateRequest("r", SamplingParams(), prompt_token_ids=[7] * 512))
    assert excinfo.value.param == "prompt"
    assert not llama_runner.has_work()
    with pytest.raises(InvalidRequestError) as excinfo:
        llama_runner.add_request(
            GenerateRequest("r", SamplingParams(length_penalty=1.0), prompt_token_ids=[7])
        )
    assert excinfo.value.param == "length_penalty"
    assert not llama_runner.has_work()


def test_max_tokens_none_runs_to_the_end_of_the_context(llama_runner: TorchCausalLMRunner) -> None:
    sampling = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    llama_runner.add_request(GenerateRequest("r", sampling, prompt_token_ids=[7] * 509))
    outputs = run_to_completion(llama_runner)
    assert len(outputs.token_ids("r")) == 3
    assert outputs.finish_reason("r") == "length"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt_token_ids": []}, "prompt"),
        ({"messages": []}, "messages"),
        ({"prompt_token_ids": [1, 10_000]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt"),
    ],
)
def test_bad_prompts_are_refused(
    llama_runner: TorchCausalLMRunner, fields: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        llama_runner.add_request(GenerateRequest("r", SamplingParams(), **fields))  # type: ignore[arg-type]
    assert excinfo.value.param == param


def test_abort_frees_running_and_waiting_sequences(tiny_lm_dirs: dict[str, Path]) -> None:
    runner = TorchCausalLMRunner(make_spec(tiny_lm_dirs["gpt2"], max_batch_size=2))
    runner.load()
    for request_id in ("a", "b", "c"):
        runner.add_request(_request(request_id, "Hello"))
    first = runner.step()
    assert [d.request_id for d in first] == ["a", "b"]  # FIFO, capped at max_batch_size
    assert (runner.num_running(), runner.num_waiting()) == (2, 1)
    runner.abort("a")
    runner.abort("unknown")
    assert runner.num_running() == 1
    assert [d.request_id for d in runner.step()] == ["b", "c"]
    runner.abort("b")
    runner.abort("c")
    assert not runner.has_work()
    assert runner.step() == []


def test_chat_template_is_applied(
    llama_runner: TorchCausalLMRunner, tiny_lm_dirs: dict[str, Path]
) -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there")]
    sampling = SamplingParams(max_tokens=2, temperature=0)
    llama_runner.add_request(GenerateRequest("chat", sampling, messages=messages))
    outputs = run_to_completion(llama_runner)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dirs["llama"])
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    expected_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert outputs.sequences["chat"].prompt_ids == expected_ids
    assert outputs.deltas["chat"][0].prompt_tokens == len(expected_ids)


def _copy_with_template(source: Path, dest: Path, template: str | None) -> Path:
    shutil.copytree(source, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if template is None:
        config.pop("chat_template")
    else:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return dest


def test_model_without_template_refuses_messages(
    tiny_lm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = _copy_with_template(tiny_lm_dirs["gpt2"], tmp_path / "m", None)
    runner = TorchCausalLMRunner(make_spec(model_dir))
    runner.load()
    with pytest.raises(InvalidRequestError, match="no chat template; use /v1/completions"):
        runner.add_request(
            GenerateRequest("r", SamplingParams(), messages=[ChatMessage("user", "hi")])
        )
    runner.add_request(_request("ok", "Hello", SamplingParams(max_tokens=1)))
    assert run_to_completion(runner).deltas["ok"][-1].finish_reason is not None


def test_hostile_template_is_stopped_by_the_sandbox(
    tiny_lm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    model_dir = _copy_with_template(tiny_lm_dirs["gpt2"], tmp_path / "m", hostile)
    runner = TorchCausalLMRunner(make_spec(model_dir))
    runner.load()
    with pytest.raises(InvalidRequestError) as excinfo:
        runner.add_request(
            GenerateRequest("r", SamplingParams(), messages=[ChatMessage("user", "hi")])
        )
    assert excinfo.value.param == "messages"
    assert not runner.has_work()


def test_warmup_leaves_the_runner_idle(llama_runner: TorchCausalLMRunner) -> None:
    llama_runner.warmup()
    assert not llama_runner.has_work()
    assert llama_runner.health()
