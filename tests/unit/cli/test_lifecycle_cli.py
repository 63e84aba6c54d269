"""``lmaas train / compress / convert``: argument checks, and the job each one would start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmaas.cli import lifecycle
from lmaas.cli.main import app


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the job commands instead of running them; the job 'succeeds'."""
    commands: list[list[str]] = []

    class _Child:
        def __init__(self, command: list[str], **_: object) -> None:
            commands.append(command)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(lifecycle.subprocess, "Popen", _Child)
    return commands


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--home", str(tmp_path)])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "image-classifier", "--name", "d"], "--sklearn-digits"),
        (["train", "image-classifier", "--name", "d", "--sklearn-digits", "--hidden-size", "30"],
         "multiple of 4"),
        (["compress", "digits:1"], "--int8 or --prune"),
        (["compress", "digits:1", "--int8", "--prune", "0.3"], "--int8 or --prune"),
        (["compress", "digits:1", "--prune", "1.5"], "--prune"),
        (["convert", "digits:1"], "--onnx"),
        (["compress", "d:1", "--prune", "0.3", "--all-layers"], "--all-layers goes with --int8"),
        (["train", "image-classifier", "--name", "d", "--sklearn-digits", "--k-fold", "1"],
         "--k-fold"),
        (["train", "chat-lora", "--name", "c", "--data", "missing.jsonl", "--base", "b"],
         "missing.jsonl"),
    ],
)  # fmt: skip
def test_bad_arguments_start_no_job(
    tmp_path: Path, started: list[list[str]], args: list[str], message: str
) -> None:
    code, output = _run(tmp_path, *args)
    assert code == 2
    assert message in output
    assert started == []


def test_commands_run_the_job_modules_with_the_home_and_database(
    tmp_path: Path, started: list[list[str]]
) -> None:
    assert _run(tmp_path, "train", "image-classifier", "--sklearn-digits", "--name", "d")[0] == 0
    assert _run(tmp_path, "compress", "d:1", "--int8", "--name", "d8")[0] == 0
    assert _run(tmp_path, "convert", "d:1", "--onnx", "--max-abs-diff", "0.001")[0] == 0
    train, comp, conv = started
    assert train[:3] == [sys.executable, "-m", "lmaas.lifecycle.jobs.train"]
    assert train[3:5] == ["image-classifier", "--sklearn-digits"]
    assert comp[2:6] == ["lmaas.lifecycle.jobs.compress", "d:1", "--int8", "--name"]
    assert conv[2] == "lmaas.lifecycle.jobs.convert" and "0.001" in conv
    for command in started:
        assert command[-4:] == [
            "--home", str(tmp_path), "--database-url", f"sqlite:///{tmp_path / 'lmaas.db'}"
        ]  # fmt: skip


def test_the_jobs_accept_every_argument_the_cli_passes(
    tmp_path: Path, started: list[list[str]]
) -> None:
    from lmaas.lifecycle.jobs import compress, convert, train

    chats = tmp_path / "chats.jsonl"
    chats.write_text("{}\n")
    invocations = [
        ["train", "image-classifier", "--sklearn-digits", "--name", "d", "--k-fold", "5"],
        ["train", "text-classifier", "--data", str(chats), "--base", "b", "--name", "t",
         "--k-fold", "3"],
        ["train", "chat-lora", "--data", str(chats), "--base", "llama", "--name", "c",
         "--rank", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj", "--lr", "1e-3"],
        ["compress", "d:2", "--int8", "--all-layers"],
        ["convert", "t:1", "--onnx", "--samples", "16"],
    ]  # fmt: skip
    for args in invocations:
        assert _run(tmp_path, *args)[0] == 0, args
    parsers = {
        "lmaas.lifecycle.jobs.train": train.build_parser(),
        "lmaas.lifecycle.jobs.compress": compress.build_parser(),
        "lmaas.lifecycle.jobs.convert": convert.build_parser(),
    }
    parsed = [parsers[command[2]].parse_args(command[3:]) for command in started]
    image, text, lora, comp, conv = parsed
    assert image.k_fold == 5 and text.k_fold == 3
    assert lora.command == "chat-lora" and lora.rank == 4 and lora.alpha == 8.0
    assert lora.target_modules == "q_proj,v_proj" and lora.test_split == 0.1
    assert lora.lr == 1e-3 and lora.epochs == 3  # the job's default
    assert comp.int8 and comp.all_layers
    assert conv.onnx and conv.samples == 16
