"""``/admin/evaluations``: evaluate a model version as a background job (admin scope).

The job runs the same code as ``lmaas eval`` (:mod:`lmaas.lifecycle.eval_jobs`), in a
subprocess, one job at a time; ``GET /admin/evaluations/{id}`` shows its progress, then its
result. The metrics are stored on the version, as ``lmaas eval`` stores them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from lmaas.api.services import services_of
from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.lifecycle.eval_jobs import EvalJob, EvaluationJobs

router = APIRouter(prefix="/admin/evaluations", tags=["admin"])


class EvaluationCreateRequest(BaseModel):
    """What to evaluate."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200, description="NAME, NAME:VERSION or NAME@ALIAS.")
    data: str = Field(
        max_length=4096, description="Absolute path of a JSONL (or .txt) file on the server."
    )
    split: str | None = Field(default=None, max_length=64)
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)


class EvaluationProgress(BaseModel):
    done: int
    total: int | None


class EvaluationResponse(BaseModel):
    """One evaluation job."""

    id: str
    object: Literal["evaluation"] = "evaluation"
    status: str
    model: str
    data: str
    split: str | None
    limit: int | None
    description: str
    progress: EvaluationProgress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None
    error: dict[str, str] | None

    @classmethod
    def of(cls, job: EvalJob) -> EvaluationResponse:
        return cls(
            id=job.id,
            status=job.status.value,
            model=job.spec.model,
            data=str(job.spec.data),
            split=job.spec.split,
            limit=job.spec.limit,
            description=job.description,
            progress=EvaluationProgress(done=job.done, total=job.total),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result=job.result,
            error=job.error,
        )


class EvaluationListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationResponse]


def _jobs(request: Request) -> EvaluationJobs:
    jobs = services_of(request).evaluations
    if jobs is None:
        raise NotSupportedError("evaluation jobs are not configured on this server")
    return jobs


@router.post("", status_code=202)
async def create_evaluation(body: EvaluationCreateRequest, request: Request) -> EvaluationResponse:
    """Queue an evaluation; poll ``GET /admin/evaluations/{id}`` for progress and result."""
    path = Path(body.data)
    if not path.is_absolute():
        raise InvalidRequestError("data must be an absolute path on the server", param="data")
    if not path.is_file():
        raise InvalidRequestError(f"data {body.data!r} is not a file on the server", param="data")
    job = _jobs(request).submit(
        body.model, path, split=body.split, limit=body.limit, max_new_tokens=body.max_new_tokens
    )
    return EvaluationResponse.of(job)


@router.get("")
def list_evaluations(request: Request) -> EvaluationListResponse:
    """Every job this server remembers (since its start), newest first."""
    return EvaluationListResponse(data=[EvaluationResponse.of(j) for j in _jobs(request).list()])


@router.get("/{job_id}")
def get_evaluation(job_id: str, request: Request) -> EvaluationResponse:
    """One job: status, progress, and the result (or error) once it finished."""
    return EvaluationResponse.of(_jobs(request).get(job_id))
