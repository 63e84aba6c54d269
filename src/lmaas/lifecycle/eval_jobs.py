"""Evaluation jobs as subprocesses: the torch-free side that the CLI and the gateway import.

The work runs in ``python -m lmaas.lifecycle.evaluate`` (torch is loaded there, never in the
gateway or CLI process); this module starts it, reads its JSON-lines events (``start``,
``progress``, ``result``, ``error``) and turns them into progress callbacks and a result, or
the :class:`~lmaas.core.errors.LmaasError` the job reported.

:class:`EvaluationJobs` is the gateway's in-memory job table behind ``/admin/evaluations``
(a :class:`~lmaas.lifecycle.job_table.JobTable`). Jobs are forgotten on restart; their results
are not, they are stored on the version.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.lifecycle.job_table import MAX_KEPT_JOBS, Events, Job, JobStatus, JobTable

__all__ = [
    "MAX_KEPT_JOBS", "EvalJob", "EvalJobSpec", "EvaluationJobs", "JobStatus", "run_evaluation",
]  # fmt: skip


@dataclass(slots=True, frozen=True)
class EvalJobSpec:
    """What to evaluate, and where the registry is.

    Attributes:
        model: ``name``, ``name:version`` or ``name@alias``.
        data: The evaluation file (a path on the machine that runs the job).
        home: ``LMAAS_HOME`` of the registry.
        database_url: The registry's metadata DB.
        split: Rows whose ``split`` field equals this; None for every row.
        limit: Evaluate the first N examples only.
        max_new_tokens: Generation cap for reference-based metrics.
        store: Record the metrics on the version.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    model: str
    data: Path
    home: Path
    database_url: str
    split: str | None = None
    limit: int | None = None
    max_new_tokens: int = 64
    store: bool = True
    device: str = "auto"

    def argv(self) -> list[str]:
        """The subprocess command line."""
        argv = [
            sys.executable, "-m", "lmaas.lifecycle.evaluate", self.model,
            "--data", str(self.data), "--home", str(self.home),
            "--database-url", self.database_url, "--device", self.device,
            "--max-new-tokens", str(self.max_new_tokens),
        ]  # fmt: skip
        if self.split:
            argv += ["--split", self.split]
        if self.limit is not None:
            argv += ["--limit", str(self.limit)]
        if not self.store:
            argv.append("--no-store")
        return argv


def run_evaluation(
    spec: EvalJobSpec,
    on_start: Callable[[int, str], None] = lambda total, description: None,
    on_done: Callable[[int], None] = lambda done: None,
) -> dict[str, Any]:
    """Run one evaluation subprocess to the end (the CLI's path).

    Args:
        spec: What to evaluate.
        on_start: Called with the number of examples and a description.
        on_done: Called with the number of examples finished so far.

    Returns:
        The result (see :class:`lmaas.lifecycle.evaluate.EvaluationResult`).

    Raises:
        LmaasError: What the job reported (bad data 400, unknown model 404...).
    """
    events = Events(lambda total, description: on_start(total or 0, description), on_done)
    with subprocess.Popen(
        spec.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        stderr_lines: list[str] = []
        stderr = process.stderr
        # stderr is drained on a thread, so a chatty library cannot fill the pipe and stall us.
        drain = threading.Thread(target=lambda: stderr_lines.extend(stderr), daemon=True)
        drain.start()
        for line in process.stdout:
            events.feed(line)
        returncode = process.wait()
        drain.join()
    return events.outcome(returncode, "".join(stderr_lines))


EvalJob = Job[EvalJobSpec]
"""One evaluation job as ``GET /admin/evaluations/{id}`` shows it."""


class EvaluationJobs(JobTable[EvalJobSpec]):
    """Runs evaluation jobs one at a time in subprocesses, and remembers them.

    Args:
        home: ``LMAAS_HOME`` of the registry the server uses.
        database_url: Its metadata DB.
        device: Device of the evaluation processes.
    """

    def __init__(self, home: Path, database_url: str, *, device: str = "auto") -> None:
        super().__init__("eval", "evaluation job")
        self._home, self._database_url, self._device = home, database_url, device

    def submit(
        self,
        model: str,
        data: Path,
        *,
        split: str | None = None,
        limit: int | None = None,
        max_new_tokens: int = 64,
    ) -> EvalJob:
        """Queue an evaluation; it starts once the jobs before it finished (call in the loop)."""
        spec = EvalJobSpec(
            model, data, self._home, self._database_url, split, limit, max_new_tokens,
            device=self._device,
        )  # fmt: skip
        return self._submit(spec)
