"""Authentication for every route, deny by default (pure ASGI: streams pass through untouched).

The middleware runs before routing, so a route added tomorrow (or a path that matches none) needs
a key without a line of code; only :data:`PUBLIC_PATHS` (the probes) are open, plus ``/metrics``
when the operator says so. Per request it:

* reads the key from ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (401 without one,
  or with a malformed, unknown, revoked or expired one);
* refuses ``/admin/*`` to keys without the ``admin`` scope, and any method but GET/HEAD/OPTIONS to
  keys without ``inference`` (403);
* puts the :class:`~lmaas.gateway.keys.Principal` on ``request.state.principal``, where
  :func:`lmaas.api.services.services_of` picks it up to hand routes an engine that shows only the
  models the key may see (others are 404, like models that do not exist).
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from lmaas.api.context import request_id_of, set_principal
from lmaas.api.errors import render_raw, to_wire
from lmaas.core.errors import AuthenticationError, LmaasError, PermissionDeniedError
from lmaas.gateway.keys import Principal

PUBLIC_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
"""The only routes that answer without a key: liveness and readiness probes."""
METRICS_PATH = "/metrics"
ADMIN_PREFIX = "/admin"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MISSING = "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


class Authenticator(Protocol):
    """Turns a presented key into a principal (``lmaas.gateway.GovernanceService`` is one)."""

    async def authenticate(self, secret: str) -> Principal:
        """Raises: AuthenticationError for a malformed, unknown, revoked or expired key."""
        ...


def presented_key(scope: Scope) -> str | None:
    """The key a request carries, or None.

    Raises:
        AuthenticationError: an ``Authorization`` header with another scheme than Bearer.
    """
    api_key: str | None = None
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                raise AuthenticationError(
                    "unsupported Authorization scheme: send 'Authorization: Bearer <key>'"
                )
            return token.strip()
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def check_access(principal: Principal, method: str, path: str) -> None:
    """What the key's scopes allow on this route, before any route code runs.

    Raises:
        PermissionDeniedError: an admin route without ``admin``, or a write/inference call
            without ``inference``.
    """
    if is_admin_path(path):
        if not principal.is_admin:
            raise PermissionDeniedError("this route needs a key with the 'admin' scope")
        return
    if method not in READ_METHODS and not principal.may_infer:
        scopes = ", ".join(sorted(s.value for s in principal.scopes))
        raise PermissionDeniedError(
            f"this key may not run inference (its scopes: {scopes}); it needs 'inference'"
        )


class AuthMiddleware:
    """Deny-by-default authentication and route-level authorization; see the module docstring.

    Args:
        app: The wrapped ASGI app (the router).
        authenticator: Checks keys.
        public_metrics: Serve ``/metrics`` without a key (for a scraper on a private network).
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator, public_metrics: bool) -> None:
        self.app = app
        self.authenticator = authenticator
        self.public = PUBLIC_PATHS | ({METRICS_PATH} if public_metrics else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        try:
            secret = presented_key(scope)
            if not secret:
                raise AuthenticationError(_MISSING)
            principal = await self.authenticator.authenticate(secret)
            check_access(principal, scope["method"], scope["path"])
        except LmaasError as exc:
            await _refuse(scope, send, exc)
            return
        set_principal(scope, principal)
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, exc: LmaasError) -> None:
    status, headers, body = render_raw(scope["path"], to_wire(exc, request_id_of(scope)))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="lmaas"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
