"""``/admin/jobs``: training, compression and conversion as background jobs (admin scope).

``POST /admin/jobs {"kind": ..., "params": {...}}`` runs what ``lmaas train ...``,
``lmaas compress`` or ``lmaas convert`` runs, with the same options (by their Python names:
``--val-split`` is ``val_split``) checked by the same rules
(:mod:`lmaas.lifecycle.job_params`), in a subprocess, one job at a time. ``GET
/admin/jobs/{id}`` shows its progress, then the version it registered (with its metrics and
lineage) or its error; ``POST /admin/jobs/{id}/cancel`` stops it the way Ctrl-C stops the CLI's
job (no version is registered); ``GET /admin/jobs/{id}/log`` is the tail of its log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from lmaas.api.services import actor_of, services_of
from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.lifecycle.job_params import JobKind, LifecycleJob, LifecycleJobs, parse_params

router = APIRouter(prefix="/admin/jobs", tags=["admin"])


class JobCreateRequest(BaseModel):
    """Which job, with which options."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind = Field(description="The CLI command: `lmaas train KIND`, compress or convert.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The command's options by their Python names (`val_split`, `sklearn_digits`"
        "); paths are absolute paths on the server.",
    )


class JobProgress(BaseModel):
    done: int
    total: int | None


class JobResponse(BaseModel):
    """One job."""

    id: str
    object: Literal["job"] = "job"
    kind: str
    status: str
    params: dict[str, Any]
    description: str
    progress: JobProgress
    actor: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None = Field(
        description="Once succeeded: `version` (name:version registered), `metrics`, `lineage`."
    )
    error: dict[str, str] | None

    @classmethod
    def of(cls, job: LifecycleJob) -> JobResponse:
        spec = job.spec
        return cls(
            id=job.id,
            kind=spec.kind,
            status=job.status.value,
            params=spec.params.model_dump(mode="json", exclude_defaults=True),
            description=job.description or f"{spec.kind} {spec.params.target()}",
            progress=JobProgress(done=job.done, total=job.total),
            actor=job.actor,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result=job.result,
            error=job.error,
        )


class JobListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobResponse]


def _jobs(request: Request) -> LifecycleJobs:
    jobs = services_of(request).jobs
    if jobs is None:
        raise NotSupportedError("lifecycle jobs are not configured on this server")
    return jobs


@router.post("", status_code=202)
async def create_job(body: JobCreateRequest, request: Request) -> JobResponse:
    """Queue a job; poll ``GET /admin/jobs/{id}`` for its progress and the new version."""
    jobs = _jobs(request)
    params = parse_params(body.kind, body.params)
    for field, path in params.paths().items():
        if not path.is_absolute():
            raise InvalidRequestError(
                f"params.{field} must be an absolute path on the server", param=f"params.{field}"
            )
        if not path.exists():
            raise InvalidRequestError(
                f"params.{field} {str(path)!r} does not exist on the server",
                param=f"params.{field}",
            )
    actor = actor_of(request)
    job = jobs.submit(body.kind, params, actor=actor)
    governance = services_of(request).governance
    if governance is not None:
        after = {"id": job.id, "kind": body.kind, "params": JobResponse.of(job).params}
        await run_in_threadpool(governance.record, actor, "job.create", job.id, after)
    return JobResponse.of(job)


@router.get("")
def list_jobs(request: Request) -> JobListResponse:
    """Every job this server remembers (since its start, the last 200), newest first."""
    return JobListResponse(data=[JobResponse.of(j) for j in _jobs(request).list()])


@router.get("/{job_id}")
def get_job(job_id: str, request: Request) -> JobResponse:
    """One job: status, progress, and the result (or error) once it finished."""
    return JobResponse.of(_jobs(request).get(job_id))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> JobResponse:
    """Stop a queued or running job; it registers no version (a finished job is unchanged)."""
    return JobResponse.of(_jobs(request).cancel(job_id))


@router.get("/{job_id}/log", response_class=PlainTextResponse)
def job_log(job_id: str, request: Request) -> PlainTextResponse:
    """The last lines of the job's log (its stderr)."""
    return PlainTextResponse("".join(_jobs(request).get(job_id).log))
