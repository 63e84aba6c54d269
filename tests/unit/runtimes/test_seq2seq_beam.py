"""Beam search in the seq2seq runner against transformers' ``generate(num_beams=k)``.

The tiny random models rarely choose EOS, so the tests that exercise finished hypotheses,
early stopping and the length penalty add a token the models do choose to the EOS ids (in the
generation config, or as a request's ``stop_token_ids``), for both sides alike.
"""

from __future__ import annotations

import collections
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from runtimes_helpers import make_spec

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import GenerateRequest, SamplingParams, SeqDelta
from lmaas.runtimes.seq2seq.torch import TorchSeq2SeqRunner
from lmaas.testing.tiny_seq2seq import SHAPES

INPUTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Every model",
    "Application developers call it with the clients they already use, every single day.",
    "a b c",
]
MAX_TOKENS = 10


@functools.cache
def hf_model(path: Path) -> tuple[Any, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch.float32)
    return model, tokenizer


def eos_ids(path: Path, **kwargs: Any) -> set[int]:
    value = kwargs.get("eos_token_id", hf_model(path)[0].generation_config.eos_token_id)
    return {value} if isinstance(value, int) else set(value)


def hf_beams(path: Path, text: str, **kwargs: Any) -> list[list[int]]:
    """generate()'s sequences for ``text`` alone, without the decoder start token and cut after
    the first EOS id (generate() pads a hypothesis shorter than the longest returned)."""
    model, tokenizer = hf_model(path)
    stop = eos_ids(path, **kwargs)
    with torch.no_grad():
        out = model.generate(**tokenizer(text, return_tensors="pt"), do_sample=False, **kwargs)
    rows: list[list[int]] = []
    for row in out.tolist():
        ids = row[1:]
        ends = [i for i, token in enumerate(ids) if token in stop]
        rows.append(ids[: ends[0] + 1] if ends else ids)
    return rows


def decode(path: Path, ids: list[int], stop: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    """The text of ``ids`` as the server sends it: a final stop token is not part of it."""
    if ids and ids[-1] in stop:
        ids = ids[:-1]
    return str(hf_model(path)[1].decode(ids, skip_special_tokens=True))


class Run:
    """What a drive produced: the deltas and the best hypothesis' token ids, per request."""

    def __init__(self) -> None:
        self.deltas: dict[str, list[SeqDelta]] = {}
        self.ids: dict[str, list[int]] = {}

    def texts(self, request_id: str) -> list[str]:
        by_index: dict[int, str] = {}
        for delta in self.deltas[request_id]:
            by_index[delta.index] = by_index.get(delta.index, "") + delta.text
        return [by_index[i] for i in sorted(by_index)]


def drive(runner: TorchSeq2SeqRunner, run: Run | None = None, num_steps: int | None = None) -> Run:
    """Step ``num_steps`` times, or until the runner is idle."""
    out = run or Run()
    for _ in range(num_steps or 1000):
        if not runner.has_work():
            return out
        # Private state, read only: the best hypothesis fills the request's sequence at the end.
        entries = [*runner._waiting, *(e for c in runner._cohorts for e in c.entries)]
        for entry in entries:
            out.ids[entry.seq.request_id] = entry.seq.output_ids
        for delta in runner.step():
            out.deltas.setdefault(delta.request_id, []).append(delta)
    if num_steps is None:
        raise AssertionError("runner did not finish")
    return out


def load(path: Path, max_batch_size: int = 32) -> TorchSeq2SeqRunner:
    spec = make_spec(path, "seq2seq", max_batch_size=max_batch_size, options={"num_threads": "1"})
    runner = TorchSeq2SeqRunner(spec)
    runner.load()
    return runner


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models step faster on one thread, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def frequent_tokens(path: Path) -> list[int]:
    """Non-special tokens the model's beams choose most often, most often first."""
    tokenizer = hf_model(path)[1]
    counts: collections.Counter[int] = collections.Counter()
    for text in INPUTS:
        for ids in hf_beams(path, text, num_beams=4, num_return_sequences=4, max_new_tokens=8):
            counts.update(set(ids) - set(tokenizer.all_special_ids))
    return [token for token, _ in counts.most_common(3)]


def frequent_token(path: Path) -> int:
    return frequent_tokens(path)[0]


def variant(source: Path, dest: Path, **generation: Any) -> Path:
    """A copy of ``source`` whose generation config sets ``generation`` on top."""
    shutil.copytree(source, dest)
    config_path = dest / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(generation)
    config_path.write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def runners(seq2seq_dirs: dict[str, Path]) -> dict[str, TorchSeq2SeqRunner]:
    return {shape: load(path) for shape, path in seq2seq_dirs.items()}


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_beam_batch_equals_generate(
    shape: str,
    num_beams: int,
    seq2seq_dirs: dict[str, Path],
    runners: dict[str, TorchSeq2SeqRunner],
) -> None:
    """Prompts of different lengths, beam and greedy requests in one batch, a second cohort
    admitted later: each beam request gives generate()'s tokens for its prompt alone."""
    runner, path = runners[shape], seq2seq_dirs[shape]
    beam = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, num_beams=num_beams)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, num_beams=1)
    run = Run()
    runner.add_request(GenerateRequest("b0", beam, prompt=INPUTS[0]))
    runner.add_request(GenerateRequest("g", greedy, prompt=INPUTS[1]))
    runner.add_request(GenerateRequest("b1", beam, prompt=INPUTS[1]))
    drive(runner, run, num_steps=2)
    runner.add_request(GenerateRequest("b2", beam, prompt=INPUTS[2]))
    runner.add_request(GenerateRequest("b3", beam, prompt=INPUTS[3]))
    drive(runner, run)
    for i, text in enumerate(INPUTS):
        (expected,) = hf_beams(path, text, num_beams=num_beams, max_new_tokens=MAX_TOKENS)
        assert run.ids[f"b{i}"] == expected, (shape, i)
        assert run.texts(f"b{i}") == [decode(path, expected)]
        deltas = run.deltas[f"b{i}"]
        assert len(deltas) == 1 and deltas[0].num_new_tokens == len(expected)
        assert deltas[0].prompt_tokens == len(hf_model(path)[1](text)["input_ids"])
    (greedy_expected,) = hf_beams(path, INPUTS[1], num_beams=1, max_new_tokens=MAX_TOKENS)
    assert run.ids["g"] == greedy_expected
    assert runner.num_running() == 0 and runner.stats()["cohorts"] == 0


@pytest.mark.parametrize(
    ("shape", "num_beams", "generation"),
    [
        ("t5", 4, {"early_stopping": True, "length_penalty": 2.0}),
        ("t5", 2, {"early_stopping": True, "length_penalty": -0.5, "min_length": 3}),
        (
            "marian",
            4,
            {"early_stopping": "never", "length_penalty": 0.5, "no_repeat_ngram_size": 2},
        ),
        ("marian", 2, {"early_stopping": "never", "length_penalty": -1.0}),
        ("bart", 4, {"early_stopping": True, "min_length": 5, "no_repeat_ngram_size": 3}),
        ("bart", 2, {"early_stopping": False, "length_penalty": 1.5, "min_length": 3}),
    ],
)
def test_checkpoint_defaults_and_rules_match_generate(
    shape: str,
    num_beams: int,
    generation: dict[str, Any],
    seq2seq_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A generation config with num_beams, EOS ids the model does choose, min_length,
    no_repeat_ngram_size, length_penalty and early_stopping: requests that name no num_beams
    decode as generate() does with that config (max_length from the config too); n=num_beams
    returns all its hypotheses."""
    source = seq2seq_dirs[shape]
    settings = {"num_beams": num_beams, "max_length": MAX_TOKENS + 3, **generation}
    probe = variant(source, tmp_path / "probe", **settings)
    eos = hf_model(source)[0].generation_config.eos_token_id
    added, hypotheses = added_eos(source, probe, eos, num_beams)
    path = variant(source, tmp_path / shape, eos_token_id=[eos, added], **settings)
    runner = load(path)
    best = SamplingParams(temperature=0.0)
    every = SamplingParams(temperature=0.0, n=num_beams)
    for i, text in enumerate(INPUTS):
        runner.add_request(GenerateRequest(f"r{i}", best, prompt=text))
        runner.add_request(GenerateRequest(f"all{i}", every, prompt=text))
    run = drive(runner)
    stop = {eos, added}
    for i in range(len(INPUTS)):
        expected = hypotheses[i][0]
        assert run.ids[f"r{i}"] == expected, (i, expected)
        assert run.texts(f"r{i}") == [decode(path, expected, stop)]
        assert run.texts(f"all{i}") == [decode(path, ids, stop) for ids in hypotheses[i]]
        lengths = [d.num_new_tokens for d in run.deltas[f"all{i}"]]
        assert lengths == [len(ids) for ids in hypotheses[i]]


def added_eos(
    source: Path, probe: Path, eos: int, num_beams: int
) -> tuple[int, list[list[list[int]]]]:
    """A token that, made an EOS id of ``probe``, ends one of generate()'s hypotheses before
    the length limit (so finished hypotheses get compared), with the hypotheses per input."""
    for token in frequent_tokens(source):
        hypotheses = [
            hf_beams(probe, text, num_return_sequences=num_beams, eos_token_id=[eos, token])
            for text in INPUTS
        ]
        if any(len(ids) < MAX_TOKENS + 2 for rows in hypotheses for ids in rows):
            return token, hypotheses
    raise AssertionError("no frequent token ends a hypothesis: the test would check too little")


@pytest.mark.parametrize("shape", SHAPES)
def test_n_best_beams_are_the_choices(
    shape: str, seq2seq_dirs: dict[str, Path], runners: dict[str, TorchSeq2SeqRunner]
) -> None:
    """n=3 of num_beams=4 with stop_token_ids: the choices are generate()'s
    num_return_sequences=3 with those ids as EOS, and their tokens are the usage."""
    runner, path = runners[shape], seq2seq_dirs[shape]
    eos = hf_model(path)[0].generation_config.eos_token_id
    stop = frequent_token(path)
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, num_beams=4, n=3, stop_token_ids=[stop]
    )
    for i, text in enumerate(INPUTS[:3]):
        runner.add_request(GenerateRequest(f"n{i}", params, prompt=text))
    run = drive(runner)
    for i, text in enumerate(INPUTS[:3]):
        expected = hf_beams(
            path,
            text,
            num_beams=4,
            num_return_sequences=3,
            max_new_tokens=MAX_TOKENS,
            eos_token_id=[eos, stop],
        )
        deltas = run.deltas[f"n{i}"]
        assert [d.index for d in deltas] == [0, 1, 2]
        assert all(d.finish_reason in ("stop", "length") for d in deltas)
        texts = [decode(path, ids, {eos, stop}) for ids in expected]
        assert run.texts(f"n{i}") == texts
        assert [d.num_new_tokens for d in deltas] == [len(ids) for ids in expected]
        assert sum(d.prompt_tokens > 0 for d in deltas) == 1


def test_min_tokens_and_stop_strings_under_beam_search(
    seq2seq_dirs: dict[str, Path], runners: dict[str, TorchSeq2SeqRunner]
) -> None:
    """min_tokens holds every beam's EOS back as generate(min_new_tokens=...) does; a stop
    string cuts the best beam's text and its token count."""
    runner, path = runners["marian"], seq2seq_dirs["marian"]
    eos = hf_model(path)[0].generation_config.eos_token_id
    stop = frequent_token(path)
    kwargs: dict[str, Any] = {"num_beams": 3, "max_new_tokens": MAX_TOKENS}
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, num_beams=3, min_tokens=4, stop_token_ids=[stop]
    )
    runner.add_request(GenerateRequest("min", params, prompt=INPUTS[1]))
    run = drive(runner)
    (expected,) = hf_beams(path, INPUTS[1], min_new_tokens=4, eos_token_id=[eos, stop], **kwargs)
    assert run.ids["min"] == expected and len(expected) >= 4
    (full,) = hf_beams(path, INPUTS[0], **kwargs)
    text = decode(path, full, {eos})
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, num_beams=3, stop=[cut])
    runner.add_request(GenerateRequest("cut", params, prompt=INPUTS[0]))
    run = drive(runner)
    (delta,) = run.deltas["cut"]
    assert delta.text == text[: text.index(cut)] and delta.finish_reason == "stop"
    assert delta.num_new_tokens == len(run.ids["cut"]) <= len(full)


def test_abort_frees_the_beams_and_spares_the_others(
    seq2seq_dirs: dict[str, Path], runners: dict[str, TorchSeq2SeqRunner]
) -> None:
    runner, path = runners["bart"], seq2seq_dirs["bart"]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, num_beams=4)
    for i, text in enumerate(INPUTS[:3]):
        runner.add_request(GenerateRequest(f"x{i}", params, prompt=text))
    run = drive(runner, num_steps=3)
    assert runner.num_running() == 12
    runner.abort("x1")
    assert runner.num_running() == 8
    drive(runner, run)
    for i in (0, 2):
        (expected,) = hf_beams(path, INPUTS[i], num_beams=4, max_new_tokens=MAX_TOKENS)
        assert run.ids[f"x{i}"] == expected
    assert "x1" not in run.deltas and not runner.has_work()


def test_a_beam_wider_than_the_batch_runs_alone(seq2seq_dirs: dict[str, Path]) -> None:
    path = seq2seq_dirs["t5"]
    runner = load(path, max_batch_size=3)
    wide = SamplingParams(max_tokens=6, temperature=0.0, num_beams=4)
    runner.add_request(GenerateRequest("wide", wide, prompt=INPUTS[0]))
    runner.add_request(GenerateRequest("next", wide, prompt=INPUTS[1]))
    run = drive(runner, num_steps=1)
    assert runner.num_running() == 4 and runner.stats()["waiting"] == 1
    drive(runner, run)
    for request_id, text in (("wide", INPUTS[0]), ("next", INPUTS[1])):
        assert run.ids[request_id] == hf_beams(path, text, num_beams=4, max_new_tokens=6)[0]


def test_sampling_requests_ignore_the_checkpoint_beams(
    seq2seq_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """temperature > 0 without num_beams samples; num_beams=1 forces greedy."""
    path = variant(seq2seq_dirs["marian"], tmp_path / "m", num_beams=4)
    runner = load(path)
    sampled = SamplingParams(max_tokens=6, temperature=0.8, seed=3)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, num_beams=1)
    runner.add_request(GenerateRequest("s", sampled, prompt=INPUTS[0]))
    runner.add_request(GenerateRequest("g", greedy, prompt=INPUTS[0]))
    run = drive(runner, num_steps=1)
    assert runner.num_running() == 2  # one row each: no beams
    drive(runner, run)
    assert run.ids["g"] == hf_beams(path, INPUTS[0], num_beams=1, max_new_tokens=6)[0]
    assert len(run.deltas["s"]) == len(run.ids["s"])  # sampling streams token by token


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (SamplingParams(temperature=0.0, num_beams=0), "num_beams"),
        (SamplingParams(temperature=0.0, num_beams=17), "num_beams"),
        (SamplingParams(temperature=0.7, num_beams=4), "temperature"),
        (SamplingParams(temperature=0.0, num_beams=2, n=3), "n"),
        (SamplingParams(temperature=0.0, n=2), "n"),
        (SamplingParams(temperature=1.0, n=2), "n"),
    ],
)
def test_bad_beam_requests_are_refused(
    runners: dict[str, TorchSeq2SeqRunner], params: SamplingParams, param: str
) -> None:
    runner = runners["marian"]
    with pytest.raises(InvalidRequestError) as info:
        runner.add_request(GenerateRequest("bad", params, prompt="hi"))
    assert info.value.param == param
    assert not runner.has_work()
