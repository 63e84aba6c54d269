"""The seq2seq runner against transformers' own generate(), for T5, Marian and BART shapes."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from runtimes_helpers import make_spec

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ChatMessage, GenerateRequest, SamplingParams, SeqDelta
from lmaas.core.types import Task
from lmaas.registry.inspection import inspect_model_dir
from lmaas.registry.sources import plan_directory
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.seq2seq.torch import TorchSeq2SeqRunner
from lmaas.testing.tiny_seq2seq import SHAPES

INPUTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Every model",
    "Application developers call it with the clients they already use, every single day.",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="session")
def runners(seq2seq_dirs: dict[str, Path]) -> dict[str, TorchSeq2SeqRunner]:
    loaded = {}
    for shape, path in seq2seq_dirs.items():
        runner = TorchSeq2SeqRunner(make_spec(path, "seq2seq", max_batch_size=8))
        runner.load()
        runner.warmup()
        loaded[shape] = runner
    return loaded


class Drive:
    """Everything a run produced: deltas per request and the generated ids."""

    def __init__(self) -> None:
        self.deltas: dict[str, list[SeqDelta]] = {}
        self.ids: dict[str, list[int]] = {}

    def text(self, request_id: str) -> str:
        return "".join(d.text for d in self.deltas[request_id])


def drive(runner: TorchSeq2SeqRunner, drive_: Drive | None = None) -> Drive:
    out = drive_ or Drive()
    for _ in range(10_000):
        if not runner.has_work():
            return out
        # Private state, read only: SeqDelta carries text, the equivalence needs token ids.
        for cohort in runner._cohorts:
            for entry in cohort.entries:
                out.ids[entry.seq.request_id] = entry.seq.output_ids
        for entry in runner._waiting:
            out.ids[entry.seq.request_id] = entry.seq.output_ids
        for delta in runner.step():
            out.deltas.setdefault(delta.request_id, []).append(delta)
    raise AssertionError("runner did not finish")


@functools.cache
def hf_model(path: Path) -> tuple[Any, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch.float32)
    return model, tokenizer


def reference(path: Path, text: str, **kwargs: Any) -> list[int]:
    model, tokenizer = hf_model(path)
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, do_sample=False, **kwargs)
    ids: list[int] = output[0].tolist()[1:]  # drop the decoder start token
    return ids


def decode(path: Path, ids: list[int]) -> str:
    tokenizer = hf_model(path)[1]
    return str(tokenizer.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_batch_equals_generate(
    shape: str, seq2seq_dirs: dict[str, Path], runners: dict[str, TorchSeq2SeqRunner]
) -> None:
    """Inputs of different lengths, admitted at different steps, each decode exactly like
    generate() on that input alone."""
    runner, path = runners[shape], seq2seq_dirs[shape]
    run = Drive()
    runner.add_request(GenerateRequest("a", GREEDY, prompt=INPUTS[0]))
    runner.add_request(GenerateRequest("b", GREEDY, prompt=INPUTS[1]))
    drive_steps(runner, run, 3)
    runner.add_request(GenerateRequest("c", GREEDY, prompt=INPUTS[2]))
    drive(runner, run)
    tokenizer = hf_model(path)[1]
    for request_id, text in zip("abc", INPUTS, strict=True):
        expected = reference(path, text, max_new_tokens=12)
        assert run.ids[request_id] == expected, request_id
        assert run.text(request_id) == decode(path, expected)
        first = run.deltas[request_id][0]
        assert first.prompt_tokens == len(tokenizer(text)["input_ids"])
        assert sum(d.num_new_tokens for d in run.deltas[request_id]) == len(expected)
        assert run.deltas[request_id][-1].finish_reason in ("stop", "length")
    assert runner.num_running() == 0 and runner.stats()["cohorts"] == 0


def drive_steps(runner: TorchSeq2SeqRunner, run: Drive, num_steps: int) -> None:
    for _ in range(num_steps):
        for cohort in runner._cohorts:
            for entry in cohort.entries:
                run.ids[entry.seq.request_id] = entry.seq.output_ids
        for entry in runner._waiting:
            run.ids[entry.seq.request_id] = entry.seq.output_ids
        for delta in runner.step():
            run.deltas.setdefault(delta.request_id, []).append(delta)


def test_generation_config_rules_match_generate(
    seq2seq_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """min_length and no_repeat_ngram_size from generation_config.json apply as in generate()."""
    path = tmp_path / "bart-rules"
    shutil.copytree(seq2seq_dirs["bart"], path)
    config_path = path / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(min_length=8, no_repeat_ngram_size=2)
    config_path.write_text(json.dumps(config))
    runner = TorchSeq2SeqRunner(make_spec(path, "seq2seq"))
    runner.load()
    params = SamplingParams(max_tokens=16, temperature=0.0)
    for i, text in enumerate(INPUTS):
        runner.add_request(GenerateRequest(f"r{i}", params, prompt=text))
    run = drive(runner)
    for i, text in enumerate(INPUTS):
        assert run.ids[f"r{i}"] == reference(path, text, max_new_tokens=16)


def test_forced_eos_at_max_tokens_reports_length(runners: dict[str, TorchSeq2SeqRunner]) -> None:
    runner = runners["marian"]
    runner.add_request(
        GenerateRequest("m", SamplingParams(max_tokens=3, temperature=0.0), prompt="x")
    )
    run = drive(runner)
    assert len(run.ids["m"]) == 3 and run.deltas["m"][-1].finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_neighbours(
    runners: dict[str, TorchSeq2SeqRunner],
) -> None:
    runner = runners["t5"]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    runner.add_request(GenerateRequest("alone", params, prompt=INPUTS[0]))
    alone = drive(runner)
    runner.add_request(GenerateRequest("n1", GREEDY, prompt=INPUTS[1]))
    runner.add_request(GenerateRequest("seeded", params, prompt=INPUTS[0]))
    runner.add_request(GenerateRequest("n2", GREEDY, prompt=INPUTS[2]))
    crowded = drive(runner)
    assert crowded.ids["seeded"] == alone.ids["alone"]
    assert len(alone.ids["alone"]) == 10


def test_stop_string_cuts_the_output(
    runners: dict[str, TorchSeq2SeqRunner], seq2seq_dirs: dict[str, Path]
) -> None:
    runner = runners["t5"]
    runner.add_request(GenerateRequest("full", GREEDY, prompt=INPUTS[0]))
    full = drive(runner).text("full")
    stop = full[4:7]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    runner.add_request(GenerateRequest("cut", params, prompt=INPUTS[0]))
    run = drive(runner)
    assert run.text("cut") == full[: full.index(stop)]
    assert run.deltas["cut"][-1].finish_reason == "stop"


def test_abort_leaves_the_other_rows_correct(
    runners: dict[str, TorchSeq2SeqRunner], seq2seq_dirs: dict[str, Path]
) -> None:
    runner = runners["bart"]
    run = Drive()
    for i, text in enumerate(INPUTS):
        runner.add_request(GenerateRequest(f"x{i}", GREEDY, prompt=text))
    drive_steps(runner, run, 2)
    runner.abort("x1")
    runner.abort("unknown")
    drive(runner, run)
    for i in (0, 2):
        assert run.ids[f"x{i}"] == reference(seq2seq_dirs["bart"], INPUTS[i], max_new_tokens=12)
    assert run.deltas["x1"][-1].finish_reason is None


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (GenerateRequest("e", GREEDY, prompt=""), "prompt"),
        (GenerateRequest("e", GREEDY, prompt="word " * 600), "prompt"),
        (GenerateRequest("e", GREEDY, prompt_token_ids=[1, 10_000]), "prompt"),
        (GenerateRequest("e", GREEDY, messages=[ChatMessage("user", "hi")]), "messages"),
        (GenerateRequest("e", SamplingParams(max_tokens=10_000), prompt="hi"), "max_tokens"),
        (GenerateRequest("e", SamplingParams(n=2), prompt="hi"), "n"),
        (GenerateRequest("e", SamplingParams(logprobs=1), prompt="hi"), "logprobs"),
        (
            GenerateRequest("e", SamplingParams(response_format="{}"), prompt="hi"),
            "response_format",
        ),
        (
            GenerateRequest("e", SamplingParams(presence_penalty=1.0), prompt="hi"),
            "presence_penalty",
        ),
    ],
)
def test_bad_requests_are_refused(
    runners: dict[str, TorchSeq2SeqRunner], request_: GenerateRequest, param: str
) -> None:
    runner = runners["marian"]
    with pytest.raises(InvalidRequestError) as info:
        runner.add_request(request_)
    assert info.value.param == param
    assert not runner.has_work()


def test_token_id_prompts_and_duplicates(runners: dict[str, TorchSeq2SeqRunner]) -> None:
    runner = runners["t5"]
    runner.add_request(GenerateRequest("ids", GREEDY, prompt_token_ids=[20, 178, 1]))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        runner.add_request(GenerateRequest("ids", GREEDY, prompt="again"))
    run = drive(runner)
    assert run.deltas["ids"][0].prompt_tokens == 3 and run.ids["ids"]


@pytest.mark.parametrize("shape", SHAPES)
def test_registry_and_catalog_see_seq2seq(shape: str, seq2seq_dirs: dict[str, Path]) -> None:
    path = seq2seq_dirs[shape]
    facts = inspect_model_dir(path)
    assert facts.task is Task.SEQ2SEQ and facts.context_length == 512
    plan = plan_directory(path, task=None, allow_pickle=False, trust_remote_code=False)
    names = {f.relative for f in plan.files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert isinstance(create_runner(make_spec(path, "seq2seq")), TorchSeq2SeqRunner)
