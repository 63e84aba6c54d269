"""Secure by default: the auth decision at start-up, and the admin key of a fresh install."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from lmaas.bootstrap.settings import Settings
from lmaas.core.errors import InvalidRequestError
from lmaas.gateway.service import GovernanceService, IssuedKey
from lmaas.gateway.usage import UsageMeter
from lmaas.gateway.usage_store import SqlUsageStore


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); never for 0.0.0.0."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_binding(settings: Settings) -> None:
    """Refuse to serve without authentication on anything but loopback.

    Raises:
        InvalidRequestError: auth is off and the host is not a loopback address.
    """
    host = settings.server.host
    if not settings.auth.enabled and not is_loopback(host):
        raise InvalidRequestError(
            f"--no-auth is refused when binding to {host!r}: without authentication lmaas binds "
            "to a loopback address only (127.0.0.1, ::1, localhost). Keep authentication on and "
            "give clients API keys (lmaas keys create), or bind to 127.0.0.1.",
            param="host",
        )


def open_governance(settings: Settings) -> GovernanceService:
    """The tenants-and-keys service over the metadata DB of ``settings``."""
    settings.home.mkdir(parents=True, exist_ok=True)
    return GovernanceService.open(
        settings.resolved_database_url(), key_cache_ttl_s=settings.auth.key_cache_ttl_s
    )


def open_usage_meter(settings: Settings) -> UsageMeter | None:
    """The usage meter of the gateway (None when metering is off)."""
    if not settings.usage.enabled:
        return None
    settings.home.mkdir(parents=True, exist_ok=True)
    return UsageMeter(
        SqlUsageStore(settings.resolved_database_url()),
        flush_interval_s=settings.usage.flush_interval_ms / 1000.0,
        batch_size=settings.usage.batch_size,
    )


def announce_admin_key(issued: IssuedKey, write: Callable[[str], None]) -> None:
    """Show the first-start admin key, the only time it exists in clear text."""
    rule = "=" * 78
    write(
        f"\n{rule}\n"
        "lmaas created an admin API key for this new install. It is shown ONCE, now;\n"
        "only its hash is stored. Keep it in a secret store.\n\n"
        f"    admin key: {issued.secret}\n\n"
        "Send it as 'Authorization: Bearer <key>'. Create scoped keys for teams with\n"
        "`lmaas keys create --tenant TEAM --scope inference` or POST /admin/keys.\n"
        f"{rule}\n"
    )
