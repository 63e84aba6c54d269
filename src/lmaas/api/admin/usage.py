"""``/admin/usage``: usage aggregated by tenant / key / model / day over a time range, as JSON
or CSV (admin scope, checked by the auth middleware for the whole ``/admin`` prefix)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.responses import Response

from lmaas.api.context import JsonResponse
from lmaas.api.services import services_of, usage_store_of
from lmaas.gateway.usage_store import GROUP_BY_FIELDS, usage_csv, usage_query

router = APIRouter(prefix="/admin/usage", tags=["admin"])


@router.get("")
async def get_usage(
    request: Request,
    group_by: Annotated[
        list[str] | None,
        Query(description=f"Fields to group by, comma-separated or repeated: {GROUP_BY_FIELDS}"),
    ] = None,
    since: Annotated[str | None, Query(description="ISO date or time, inclusive (UTC)")] = None,
    until: Annotated[str | None, Query(description="ISO date or time, exclusive (UTC)")] = None,
    tenant: str | None = None,
    key: Annotated[str | None, Query(description="key id, <id> or lmaas-<id>")] = None,
    model: str | None = None,
    format: Literal["json", "csv"] = "json",  # the documented query parameter
) -> Response:
    """Sums per group: requests, prompt/completion/embedding/total tokens, audio seconds,
    images, errors (status >= 400), cancelled requests and average latency (ms). Records still
    in the gateway's buffer are written first, so the answer includes every finished request."""
    query = usage_query(group_by, since, until, tenant, key, model)
    store = usage_store_of(request)
    meter = services_of(request).meter
    if meter is not None:
        await meter.flush()
    rows = await anyio.to_thread.run_sync(store.aggregate, query)
    if format == "csv":
        return Response(
            usage_csv(rows, query.group_by),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="lmaas-usage.csv"'},
        )
    body: dict[str, Any] = {
        "object": "list",
        "group_by": list(query.group_by),
        "since": None if query.since is None else query.since.isoformat(),
        "until": None if query.until is None else query.until.isoformat(),
        "data": rows,
    }
    return JsonResponse(body)
