"""Evaluation jobs as subprocesses: the torch-free side that the CLI and the gateway import.

The work runs in ``python -m lmaas.lifecycle.evaluate`` (torch is loaded there, never in the
gateway or CLI process); this module starts it, reads its JSON-lines events (``start``,
``progress``, ``result``, ``error``) and turns them into progress callbacks and a result, or
the :class:`~lmaas.core.errors.LmaasError` the job reported.

:class:`EvaluationJobs` is the gateway's in-memory job table behind ``/admin/evaluations``: one
job runs at a time (the models being served share the CPU), the rest wait in order. Jobs are
forgotten on restart; their results are not, they are stored on the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import subprocess
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmaas.core.errors import InternalError, LmaasError, NotFoundError, error_from_code

MAX_KEPT_JOBS = 200
"""Finished jobs kept in memory for ``GET /admin/evaluations/{id}``; the oldest go first."""

_MAX_STDERR_CHARS = 4000


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


class _Events:
    """Folds the event stream into progress calls and a final result or error."""

    def __init__(self, on_start: Callable[[int, str], None], on_done: Callable[[int], None]):
        self._on_start, self._on_done = on_start, on_done
        self.result: dict[str, Any] | None = None
        self.error: LmaasError | None = None

    def feed(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return  # a stray print of a library; the protocol lines are JSON objects
        if not isinstance(event, dict):
            return
        kind = event.get("event")
        if kind == "start":
            self._on_start(int(event["total"]), str(event["description"]))
        elif kind == "progress":
            self._on_done(int(event["done"]))
        elif kind == "result":
            self.result = event["result"]
        elif kind == "error":
            self.error = error_from_code(str(event["code"]), str(event["message"]))

    def outcome(self, returncode: int, stderr: str) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        if returncode != 0 or self.result is None:
            tail = stderr[-_MAX_STDERR_CHARS:]
            raise InternalError(f"the evaluation process exited with code {returncode}: {tail}")
        return self.result


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
    events = _Events(on_start, on_done)
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


class JobStatus(enum.StrEnum):
    """Where an evaluation job is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class EvalJob:
    """One evaluation job as ``GET /admin/evaluations/{id}`` shows it."""

    id: str
    spec: EvalJobSpec
    created_at: datetime
    status: JobStatus = JobStatus.QUEUED
    total: int | None = None
    done: int = 0
    description: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)


class EvaluationJobs:
    """Runs evaluation jobs one at a time in subprocesses, and remembers them.

    Args:
        home: ``LMAAS_HOME`` of the registry the server uses.
        database_url: Its metadata DB.
        device: Device of the evaluation processes.
    """

    def __init__(self, home: Path, database_url: str, *, device: str = "auto") -> None:
        self._home, self._database_url, self._device = home, database_url, device
        self._jobs: OrderedDict[str, EvalJob] = OrderedDict()
        self._one_at_a_time = asyncio.Lock()
        self._processes: dict[str, asyncio.subprocess.Process] = {}

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
        job = EvalJob(id=f"eval-{uuid.uuid4().hex[:16]}", spec=spec, created_at=_now())
        self._jobs[job.id] = job
        self._forget_old()
        job._task = asyncio.get_running_loop().create_task(self._run(job))
        return job

    def get(self, job_id: str) -> EvalJob:
        """One job.

        Raises:
            NotFoundError: No such job (or forgotten after a restart).
        """
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"evaluation job {job_id!r} does not exist", param="id")
        return job

    def list(self) -> list[EvalJob]:
        """Every remembered job, newest first."""
        return list(reversed(self._jobs.values()))

    async def _run(self, job: EvalJob) -> None:
        async with self._one_at_a_time:
            job.status, job.started_at = JobStatus.RUNNING, _now()
            try:
                job.result = await self._run_process(job)
                job.status = JobStatus.SUCCEEDED
            except asyncio.CancelledError:
                job.status = JobStatus.CANCELLED
                raise
            except LmaasError as exc:
                job.status, job.error = JobStatus.FAILED, {"code": exc.code, "message": exc.message}
            finally:
                job.finished_at = _now()

    async def _run_process(self, job: EvalJob) -> dict[str, Any]:
        def on_start(total: int, description: str) -> None:
            job.total, job.description = total, description

        def on_done(done: int) -> None:
            job.done = done

        events = _Events(on_start, on_done)
        process = await asyncio.create_subprocess_exec(
            *job.spec.argv(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self._processes[job.id] = process
        try:
            assert process.stdout is not None and process.stderr is not None
            stderr_task = asyncio.ensure_future(process.stderr.read())
            async for raw in process.stdout:
                events.feed(raw.decode("utf-8", errors="replace"))
            returncode = await process.wait()
            stderr = (await stderr_task).decode("utf-8", errors="replace")
        finally:
            self._processes.pop(job.id, None)
            if process.returncode is None:
                process.kill()
                with contextlib.suppress(ProcessLookupError):
                    await process.wait()
        return events.outcome(returncode, stderr)

    def _forget_old(self) -> None:
        while len(self._jobs) > MAX_KEPT_JOBS:
            oldest = next(iter(self._jobs.values()))
            if oldest.status in {JobStatus.QUEUED, JobStatus.RUNNING}:
                break
            self._jobs.popitem(last=False)

    async def aclose(self) -> None:
        """Cancel queued and running jobs (their processes are killed)."""
        tasks = [j._task for j in self._jobs.values() if j._task is not None and not j._task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _now() -> datetime:
    return datetime.now(UTC)
