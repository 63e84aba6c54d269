"""``/admin/tenants``: create, list, show and delete tenants (admin scope; checked by the auth
middleware for the whole ``/admin`` prefix). The handlers are sync: FastAPI runs them on its
thread pool, so DB calls never block the event loop."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request

from lmaas.api.admin.schemas import (
    LimitsBody,
    TenantCreateRequest,
    TenantDeletedResponse,
    TenantListResponse,
    TenantResponse,
    TenantWeightRequest,
)
from lmaas.api.services import actor_of, governance_of

router = APIRouter(prefix="/admin/tenants", tags=["admin"])


@router.post("", status_code=201)
def create_tenant(body: TenantCreateRequest, request: Request) -> TenantResponse:
    """Create a tenant (a team that owns keys); 409 when the name is taken."""
    governance = governance_of(request)
    tenant = governance.create_tenant(
        body.name,
        body.description,
        body.limits.to_limits(),
        body.weight,
        actor=actor_of(request),
    )
    return TenantResponse.of(tenant)


@router.get("")
def list_tenants(request: Request) -> TenantListResponse:
    """Every tenant, by name."""
    tenants = governance_of(request).list_tenants()
    return TenantListResponse(data=[TenantResponse.of(t) for t in tenants])


@router.get("/{name}")
def get_tenant(name: str, request: Request) -> TenantResponse:
    """One tenant; 404 when unknown."""
    return TenantResponse.of(governance_of(request).get_tenant(name))


@router.put("/{name}/limits")
def set_tenant_limits(name: str, body: LimitsBody, request: Request) -> TenantResponse:
    """Replace the limits the tenant's keys share (absent or null fields: unlimited)."""
    governance = governance_of(request)
    tenant = governance.set_tenant_limits(name, body.to_limits(), actor=actor_of(request))
    return TenantResponse.of(tenant)


@router.put("/{name}/weight")
def set_tenant_weight(name: str, body: TenantWeightRequest, request: Request) -> TenantResponse:
    """Set the tenant's fair-share weight in the engine queues (default 1)."""
    tenant = governance_of(request).set_tenant_weight(name, body.weight, actor=actor_of(request))
    return TenantResponse.of(tenant)


@router.delete("/{name}")
def delete_tenant(name: str, request: Request) -> TenantDeletedResponse:
    """Delete a tenant and all its keys; 409 if that would remove the last admin key."""
    tenant = governance_of(request).delete_tenant(name, actor=actor_of(request))
    return TenantDeletedResponse(name=tenant.name)
