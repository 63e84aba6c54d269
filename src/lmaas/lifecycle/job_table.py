"""The gateway's in-memory table of background jobs run as subprocesses.

A job is a command line (its spec's ``argv()``) run with ``LMAAS_JOB_EVENTS=1`` in the
environment; it reports JSON lines on stdout (``start``, ``progress``, ``result``, ``error``,
see :func:`emit_event`), which become the job's progress and its result or error. Other stdout
lines are ignored; the last lines of stderr (the job's log) are kept for ``.../log``.

One job runs at a time (the models being served share the CPU), the rest wait in order. Jobs
are forgotten on restart; what they produced is not (it is in the registry). Used by
``/admin/evaluations`` (:class:`lmaas.lifecycle.eval_jobs.EvaluationJobs`) and ``/admin/jobs``
(:class:`lmaas.lifecycle.job_params.LifecycleJobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import signal
import sys
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from lmaas.core.errors import InternalError, LmaasError, NotFoundError, error_from_code

MAX_KEPT_JOBS = 200
"""Finished jobs kept in memory for ``GET .../{id}``; the oldest go first."""

EVENTS_ENV = "LMAAS_JOB_EVENTS"
"""Set to ``1`` in a job's environment: it then reports its events as JSON lines on stdout."""

LOG_LINES = 200
"""Lines of a job's stderr kept for ``GET /admin/jobs/{id}/log``."""

CANCEL_GRACE_S = 30.0
"""How long a cancelled job has to stop after SIGINT before it is killed."""

_MAX_STDERR_CHARS = 4000
_CANCELLED_CODES = {130, -signal.SIGINT}


def events_enabled() -> bool:
    """Whether this process is a job whose runner reads JSON events."""
    return os.environ.get(EVENTS_ENV) == "1"


def emit_event(event: str, **fields: Any) -> None:
    """Print one event line on stdout when the runner asked for events (no-op otherwise)."""
    if events_enabled():
        print(json.dumps({"event": event, **fields}, default=str), file=sys.stdout, flush=True)


class Events:
    """Folds the event stream into progress calls and a final result or error."""

    def __init__(self, on_start: Callable[[int | None, str], None], on_done: Callable[[int], None]):
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
            total = event.get("total")
            self._on_start(None if total is None else int(total), str(event["description"]))
        elif kind == "progress":
            self._on_done(int(event["done"]))
        elif kind == "result":
            self.result = event["result"]
        elif kind == "error":
            self.error = error_from_code(str(event["code"]), str(event["message"]))

    def outcome(self, returncode: int, stderr: str, noun: str = "evaluation") -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        if returncode != 0 or self.result is None:
            tail = stderr[-_MAX_STDERR_CHARS:]
            raise InternalError(f"the {noun} process exited with code {returncode}: {tail}")
        return self.result


class JobStatus(enum.StrEnum):
    """Where a job is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobSpec(Protocol):
    def argv(self) -> list[str]: ...


S = TypeVar("S", bound=JobSpec)


@dataclass(slots=True)
class Job(Generic[S]):
    """One job as ``GET .../{id}`` shows it."""

    id: str
    spec: S
    created_at: datetime
    status: JobStatus = JobStatus.QUEUED
    total: int | None = None
    done: int = 0
    description: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    actor: str | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES), repr=False)
    cancel_requested: bool = False
    _task: asyncio.Task[None] | None = field(default=None, repr=False)


class JobTable(Generic[S]):
    """Runs jobs one at a time in subprocesses, and remembers the last :data:`MAX_KEPT_JOBS`.

    Args:
        prefix: Of the job ids (``eval``, ``job``).
        noun: What a job is called in messages (``evaluation job``).
    """

    def __init__(self, prefix: str, noun: str) -> None:
        self._prefix, self._noun = prefix, noun
        self._jobs: OrderedDict[str, Job[S]] = OrderedDict()
        self._one_at_a_time = asyncio.Lock()
        self._processes: dict[str, asyncio.subprocess.Process] = {}

    def _submit(self, spec: S, *, actor: str | None = None) -> Job[S]:
        """Queue a job; it starts once the jobs before it finished (call in the loop)."""
        job: Job[S] = Job(id=f"{self._prefix}-{uuid.uuid4().hex[:16]}", spec=spec,
                          created_at=_now(), actor=actor)  # fmt: skip
        self._jobs[job.id] = job
        self._forget_old()
        job._task = asyncio.get_running_loop().create_task(self._run(job))
        return job

    def get(self, job_id: str) -> Job[S]:
        """One job.

        Raises:
            NotFoundError: No such job (or forgotten after a restart).
        """
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"{self._noun} {job_id!r} does not exist", param="id")
        return job

    def list(self) -> list[Job[S]]:
        """Every remembered job, newest first."""
        return list(reversed(self._jobs.values()))

    def cancel(self, job_id: str) -> Job[S]:
        """Cancel a job: a queued one never starts; a running one gets SIGINT (the job's Ctrl-C
        path: it stops and registers nothing), then SIGKILL after :data:`CANCEL_GRACE_S`. A
        finished job is left as it is.

        Raises:
            NotFoundError: No such job.
        """
        job = self.get(job_id)
        if job.status in FINISHED:
            return job
        job.cancel_requested = True
        process = self._processes.get(job.id)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, _kill, process)
        elif job.status is JobStatus.QUEUED and job._task is not None:
            job._task.cancel()
        return job

    async def _run(self, job: Job[S]) -> None:
        try:
            async with self._one_at_a_time:
                if job.cancel_requested:
                    raise asyncio.CancelledError
                job.status, job.started_at = JobStatus.RUNNING, _now()
                try:
                    job.result = await self._run_process(job)
                    job.status = JobStatus.SUCCEEDED
                except LmaasError as exc:
                    job.status = JobStatus.FAILED
                    job.error = {"code": exc.code, "message": exc.message}
        except asyncio.CancelledError:
            job.status = JobStatus.CANCELLED
            if not job.cancel_requested:
                raise  # the server is closing
        finally:
            job.finished_at = _now()

    async def _run_process(self, job: Job[S]) -> dict[str, Any]:
        def on_start(total: int | None, description: str) -> None:
            job.total, job.description = total, description

        def on_done(done: int) -> None:
            job.done = done

        events = Events(on_start, on_done)
        process = await asyncio.create_subprocess_exec(
            *job.spec.argv(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, EVENTS_ENV: "1"},
        )
        self._processes[job.id] = process
        try:
            assert process.stdout is not None and process.stderr is not None
            stderr_task = asyncio.ensure_future(_read_log(process.stderr, job.log))
            async for raw in process.stdout:
                events.feed(raw.decode("utf-8", errors="replace"))
            returncode = await process.wait()
            await stderr_task
        finally:
            self._processes.pop(job.id, None)
            if process.returncode is None:
                process.kill()
                with contextlib.suppress(ProcessLookupError):
                    await process.wait()
        if job.cancel_requested and (returncode in _CANCELLED_CODES or returncode < 0):
            raise asyncio.CancelledError
        return events.outcome(returncode, "".join(job.log), self._noun.split()[0])

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


async def _read_log(stream: asyncio.StreamReader, log: deque[str]) -> None:
    async for raw in stream:
        log.append(raw.decode("utf-8", errors="replace"))


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def _now() -> datetime:
    return datetime.now(UTC)
