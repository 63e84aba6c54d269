"""Helpers shared by the runtime tests: worker specs and driving a generation runner."""

from __future__ import annotations

from pathlib import Path

from lmaas.core.messages import SeqDelta, WorkerSpec
from lmaas.runtimes.llm.sequence import GenerationSequence
from lmaas.runtimes.llm.torch import TorchCausalLMRunner


def make_spec(model_dir: Path, task: str = "chat", **overrides: object) -> WorkerSpec:
    fields: dict[str, object] = {
        "model_name": "tiny",
        "model_version": "1",
        "task": task,
        "format": "safetensors",
        "model_dir": str(model_dir),
        "files": [],
        "requests_endpoint": "inproc://requests",
        "results_endpoint": "inproc://results",
        "dtype": "float32",
        "device": "cpu",
    }
    fields.update(overrides)
    return WorkerSpec(**fields)  # type: ignore[arg-type]


class Outputs:
    """What a drive through a runner produced, per request."""

    def __init__(self) -> None:
        self.deltas: dict[str, list[SeqDelta]] = {}
        self.sequences: dict[str, GenerationSequence] = {}

    def text(self, request_id: str) -> str:
        return "".join(d.text for d in self.deltas[request_id])

    def token_ids(self, request_id: str) -> list[int]:
        return self.sequences[request_id].output_ids

    def finish_reason(self, request_id: str) -> str | None:
        return self.deltas[request_id][-1].finish_reason


def run_to_completion(runner: TorchCausalLMRunner, max_steps: int = 10_000) -> Outputs:
    """Step until idle, keeping each sequence object so its token ids can be checked."""
    outputs = Outputs()
    for _ in range(max_steps):
        if not runner.has_work():
            return outputs
        # Private state, read only: the SeqDelta wire type carries text, not token ids.
        for entry in [*runner._running.values(), *runner._waiting]:
            outputs.sequences.setdefault(entry.seq.request_id, entry.seq)
        for delta in runner.step():
            outputs.deltas.setdefault(delta.request_id, []).append(delta)
    raise AssertionError("runner did not finish")
