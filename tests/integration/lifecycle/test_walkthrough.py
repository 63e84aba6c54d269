"""The walk-through of ``docs/lifecycle.md``, run as written: import → eval → int8 → ONNX →
serve → canary → promote → rollback, with the CLI only.

The ``bash`` blocks between ``<!-- walkthrough:begin -->`` and ``<!-- walkthrough:end -->`` run
in order in one bash process (``set -eo pipefail``: a failing command ends the run), with the
variables of the ``<!-- walkthrough:inputs -->`` block pointing at a tiny random-weight BERT
classifier and a labelled JSONL made here. The shell runs in a session of its own, so the
server it starts in the background (and that server's workers) are stopped with it whatever
happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_text_heads import build_tiny_classifier, write_labelled_texts
from tests.integration.serverproc import free_port

DOC = Path(__file__).parents[3] / "docs" / "lifecycle.md"
INPUTS = {"LMAAS_HOME", "CKPT", "DATA", "PORT"}
STEP_TIMEOUT_S = 240.0
MARK = "@@walkthrough-step-done"


def doc_blocks() -> tuple[str, list[str]]:
    """The inputs block and the blocks to run, from the walk-through section of the doc."""
    text = DOC.read_text(encoding="utf-8")
    inputs = re.search(r"<!-- walkthrough:inputs -->\s*```bash\n(.*?)```", text, re.S)
    section = re.search(r"<!-- walkthrough:begin -->(.*?)<!-- walkthrough:end -->", text, re.S)
    assert inputs is not None and section is not None, "walk-through markers missing"
    return inputs.group(1), re.findall(r"```bash\n(.*?)```", section.group(1), re.S)


def test_the_inputs_block_sets_the_variables_the_walkthrough_uses() -> None:
    inputs, blocks = doc_blocks()
    assigned = set(re.findall(r"^(?:export )?([A-Z_]+)=", inputs, re.M))
    assert assigned == INPUTS
    used = set(re.findall(r"\$\{?([A-Z_]+)", "\n".join(blocks)))
    defined = set(re.findall(r"^([A-Z_]+)=", "\n".join(blocks), re.M))
    assert used - defined == INPUTS


def _labelled(path: Path) -> Path:
    return write_labelled_texts(path, per_label=8)


@dataclass
class Shell:
    """One bash process the doc's blocks are fed to, block by block."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]

    @classmethod
    def start(cls, cwd: Path, env: dict[str, str]) -> Shell:
        process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=cwd, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        shell = cls(process, lines)
        shell.send("set -eo pipefail\n")
        return shell

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def run(self, block: str, index: int) -> str:
        """Run one block; its output. Fails when a command fails or the block hangs."""
        self.send(f"{block}\necho; echo {MARK} {index}\n")  # after output without a newline
        output: list[str] = []
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                # A process the shell started in the background may hold its stdout open after
                # the shell died, so EOF alone does not tell.
                line = None if self.process.poll() is not None else ""
            if line is None:
                code = self.process.wait()
                pytest.fail(f"step {index} exited {code}:\n{block}\n---\n{''.join(output)}")
            if line.strip() == f"{MARK} {index}":
                return "".join(output)
            output.append(line)
            if time.monotonic() > deadline:
                pytest.fail(f"step {index} did not finish in {STEP_TIMEOUT_S:.0f}s:\n{block}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """End the shell and everything it started (SIGTERM, then SIGKILL, to its process
        group); True when all of it ended on its own once the shell's input closed."""
        group = self.process.pid  # a session (and group) of its own: start_new_session
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
        if _wait_group_gone(self.process, group, timeout_s / 2):
            return True
        _signal_group(group, signal.SIGTERM)
        if not _wait_group_gone(self.process, group, timeout_s / 2):
            _signal_group(group, signal.SIGKILL)
            _wait_group_gone(self.process, group, 10)
        return False


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _wait_group_gone(process: subprocess.Popen[str], group: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:  # reap the shell, or its zombie keeps the group alive
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.2)
    return False


def test_a_failing_step_ends_the_run_and_stop_leaves_no_process(tmp_path: Path) -> None:
    shell = Shell.start(tmp_path, dict(os.environ))
    try:
        assert shell.run("sleep 600 &\necho started", 0).strip() == "started"
        with pytest.raises(pytest.fail.Exception, match="step 1 exited 1"):
            shell.run("false\necho not reached", 1)
    finally:
        assert not shell.stop(timeout_s=4)  # the sleeper needed the SIGTERM
    with pytest.raises(ProcessLookupError):
        os.killpg(shell.process.pid, 0)


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[tuple[Shell, Path]]:
    checkpoint = build_tiny_classifier(tmp_path / "ckpt", seed=6)
    venv_bin = str(Path(sys.executable).parent)
    assert Path(venv_bin, "lmaas").exists(), f"no lmaas script next to {sys.executable}"
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "LMAAS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "LMAAS_HOME": str(home),
        "CKPT": str(checkpoint),
        "DATA": str(_labelled(tmp_path / "labelled.jsonl")),
        "PORT": str(free_port()),
    }
    env.pop("LMAAS_DATABASE_URL", None)
    shell = Shell.start(tmp_path, env)
    try:
        yield shell, home
    finally:
        shell.stop()


def _counts(output: str) -> dict[str, int]:
    """``served N``'s lines (``  18 x-lmaas-model-version: 1``) as {version: count}."""
    found = re.findall(r"^\s*(\d+) x-lmaas-model-version: (\S+)$", output, re.M | re.I)
    return {version: int(count) for count, version in found}


@pytest.mark.timeout(600)  # 16 CLI calls, 5 jobs, 3 worker starts: 130-190 s on 2 busy cores
def test_the_walkthrough_runs_as_documented(walk: tuple[Shell, Path]) -> None:
    shell, home = walk
    _, blocks = doc_blocks()
    outputs: list[str] = []
    started = time.monotonic()
    try:
        for index, block in enumerate(blocks):
            outputs.append(shell.run(block, index))
            with (home.parent / "transcript.txt").open("a") as transcript:  # for a reader
                transcript.write(f"$ {block}[{time.monotonic() - started:.1f}s]\n{outputs[-1]}\n")
    except BaseException:
        log = home / "serve.log"
        if log.exists():
            print(f"--- {log} (end)\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise

    def output_of(fragment: str) -> str:
        matches = [out for block, out in zip(blocks, outputs, strict=True) if fragment in block]
        assert len(matches) == 1, fragment
        return matches[0]

    assert "imported sentiment:1 (classification" in output_of("lmaas models import")
    assert "registered sentiment:2 from sentiment:1" in output_of("--int8")
    converted = output_of("--onnx")
    assert re.search(r"top-1 agreement 1\.0+ ", converted), converted
    assert "registered sentiment:3 from sentiment:1" in converted
    classified = output_of("lmaas serve")
    assert '"model":"sentiment"' in classified and '"label":' in classified, classified
    assert _counts(output_of("served() {")) == {"1": 5}
    canary = _counts(output_of("--canary 3"))
    assert sum(canary.values()) == 20 and 1 <= canary.get("3", 0) <= 4, canary
    promoted = output_of("--promote")
    assert "gate: accuracy on" in promoted and _counts(promoted) == {"3": 5}, promoted
    assert _counts(output_of("--rollback")) == {"1": 5}
    assert "gate passed" in output_of("lmaas deploy history")
    done = subprocess.run(
        [Path(sys.executable).parent / "lmaas", "deploy", "history", "sentiment", "--json",
         "--home", str(home)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    changes = [
        (c["action"], c["spec"]["stable"], c["spec"]["canary"]) for c in json.loads(done.stdout)
    ]
    assert changes == [
        ("set", "1", None),
        ("canary", "1", "3"),
        ("promote", "3", None),
        ("rollback", "1", None),
    ]

    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        versions = {v: registry.get("sentiment", v) for v in ("1", "2", "3")}
        lineage = {
            v: (m.lineage.parent, m.lineage.transform) for v, m in versions.items() if m.lineage
        }
        assert lineage == {
            "2": ("sentiment:1", "quantize-int8"),
            "3": ("sentiment:1", "onnx-export"),
        }
        assert versions["3"].format.value == "onnx"
        for manifest in versions.values():  # the evaluations the gate compared
            assert "accuracy" in {m.metric for m in registry.metrics(manifest)}
    assert shell.stop(), "the walk-through's server did not stop on `kill $SERVER`"
    print(f"walk-through: {len(blocks)} blocks in {time.monotonic() - started:.1f}s")
