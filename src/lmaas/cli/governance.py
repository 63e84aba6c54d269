"""``lmaas tenants`` and ``lmaas keys``: manage tenants and API keys in the metadata DB directly
(``--home`` / ``LMAAS_HOME`` / ``LMAAS_DATABASE_URL``; no server needed), over the same
:class:`~lmaas.gateway.service.GovernanceService` as the ``/admin`` routes."""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmaas.bootstrap.governance import open_governance
from lmaas.cli.common import fail, load_settings
from lmaas.core.errors import LmaasError
from lmaas.gateway.limits import Limits
from lmaas.gateway.quotas import Quota, QuotaMetric, parse_quota, quotas_text
from lmaas.gateway.service import GovernanceService, IssuedKey
from lmaas.gateway.store import ApiKey, Tenant

tenants_app = typer.Typer(help="Create, list, show and delete tenants.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Create, list, show, rotate and revoke API keys (a secret is shown once).",
    no_args_is_help=True,
)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="lmaas home directory (default: $LMAAS_HOME or ~/.lmaas)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
RpmOption = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
TpmOption = Annotated[
    int | None, typer.Option("--tpm", help="Tokens per minute (prompt + max_tokens reserved).")
]
ConcurrentOption = Annotated[
    int | None, typer.Option("--max-concurrent", help="Requests in flight at once.")
]

_QUOTA_HELP = (
    "AMOUNT/day or AMOUNT/month (UTC); repeat for both; replaces the metric's quotas, "
    "0 removes them."
)
QuotaTokensOption = Annotated[
    list[str] | None,
    typer.Option("--quota-tokens", help=f"Tokens quota: {_QUOTA_HELP}", metavar="N/PERIOD"),
]
QuotaRequestsOption = Annotated[
    list[str] | None,
    typer.Option("--quota-requests", help=f"Requests quota: {_QUOTA_HELP}", metavar="N/PERIOD"),
]
QuotaAudioOption = Annotated[
    list[str] | None,
    typer.Option(
        "--quota-audio-seconds",
        help=f"Seconds of audio transcribed: {_QUOTA_HELP}",
        metavar="N/PERIOD",
    ),
]
QuotaImagesOption = Annotated[
    list[str] | None,
    typer.Option("--quota-images", help=f"Images classified: {_QUOTA_HELP}", metavar="N/PERIOD"),
]

WeightOption = Annotated[
    float,
    typer.Option(
        "--weight", help="Fair-share weight in the engine queues (default 1; 3 = thrice the share)."
    ),
]


def _limits_text(limits: Limits) -> str:
    parts = [
        f"{value} {unit}"
        for value, unit in (
            (limits.rpm, "rpm"),
            (limits.tpm, "tpm"),
            (limits.max_concurrent, "conc"),
        )
        if value is not None
    ]
    if limits.quotas:
        parts.append(quotas_text(limits.quotas))
    return ", ".join(parts) or "-"


def _limits_dict(limits: Limits) -> dict[str, Any]:
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "max_concurrent": limits.max_concurrent,
        "quotas": [q.as_dict() for q in limits.quotas],
    }


QuotaFlags = dict[QuotaMetric, list[str] | None]


def _quota_flags(
    tokens: list[str] | None,
    requests: list[str] | None,
    audio: list[str] | None,
    images: list[str] | None,
) -> QuotaFlags:
    return {
        QuotaMetric.TOKENS: tokens,
        QuotaMetric.REQUESTS: requests,
        QuotaMetric.AUDIO_SECONDS: audio,
        QuotaMetric.IMAGES: images,
    }


def _quotas(current: tuple[Quota, ...], flags: QuotaFlags) -> tuple[Quota, ...]:
    """``current`` with the metrics given on the command line replaced (``0``: none)."""
    kept = [q for q in current if not flags.get(q.metric)]
    for metric, values in flags.items():
        for value in values or ():
            quota = parse_quota(metric.value, value)
            if quota is not None:
                kept.append(quota)
    return tuple(kept)


def _merged(
    current: Limits,
    rpm: int | None,
    tpm: int | None,
    conc: int | None,
    quota_flags: QuotaFlags | None = None,
) -> Limits:
    """``current`` with the given flags applied; 0 removes a limit."""

    def pick(new: int | None, old: int | None) -> int | None:
        if new is None:
            return old
        return None if new == 0 else new

    return Limits(
        pick(rpm, current.rpm),
        pick(tpm, current.tpm),
        pick(conc, current.max_concurrent),
        _quotas(current.quotas, quota_flags or {}),
    )


@contextmanager
def _governance(home: Path | None) -> Iterator[GovernanceService]:
    """Open the service of ``home``; any LmaasError becomes one red line and exit code 1."""
    try:
        service = open_governance(load_settings(home))
        service.actor = cli_actor()
    except LmaasError as exc:
        fail(exc.message)
    try:
        yield service
    except LmaasError as exc:
        fail(exc.message)
    finally:
        service.close()


def cli_actor() -> str:
    """Who the audit trail names for a CLI command: ``cli:<os user>``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment nor the passwd database
        user = f"uid-{os.getuid()}"
    return f"cli:{user}"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _tenant_dict(tenant: Tenant) -> dict[str, Any]:
    return {
        "name": tenant.name,
        "description": tenant.description,
        "created_at": tenant.created_at.isoformat(),
        "limits": _limits_dict(tenant.limits),
        "weight": tenant.weight,
    }


def _key_dict(key: ApiKey, now: datetime) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": key.id,
        "prefix": key.prefix,
        "tenant": key.tenant,
        "name": key.name,
        "scopes": sorted(s.value for s in key.scopes),
        "models": list(key.models),
        "status": key.status(now),
        "created_at": key.created_at.isoformat(),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
        "rotated_at": iso(key.rotated_at),
        "limits": _limits_dict(key.limits),
    }


def _keys_table(keys: list[ApiKey]) -> Table:
    now = datetime.now(UTC)
    table = Table(box=None)
    table.add_column("KEY", no_wrap=True)
    for header in ("TENANT", "NAME", "SCOPES", "MODELS", "LIMITS", "STATUS", "EXPIRES"):
        table.add_column(header, overflow="fold")
    for key in keys:
        scopes = ",".join(sorted(s.value for s in key.scopes))
        table.add_row(
            key.prefix,
            key.tenant,
            escape(key.name) or "-",
            scopes,
            ",".join(key.models),
            _limits_text(key.limits),
            key.status(now),
            "-" if key.expires_at is None else key.expires_at.strftime("%Y-%m-%d"),
        )
    return table


def _print_issued(issued: IssuedKey, as_json: bool, verb: str) -> None:
    if as_json:
        typer.echo(
            json.dumps({**_key_dict(issued.key, datetime.now(UTC)), "secret": issued.secret})
        )
        return
    Console(stderr=True).print(
        f"{verb} key {issued.key.prefix} for tenant {issued.key.tenant!r}; "
        "[bold]the secret below is shown once[/bold] (only its hash is stored):",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(issued.secret)


# ------------------------------------------------------------------------- tenants


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name (lower-case, digits, . _ -).")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrent: ConcurrentOption = None,
    quota_tokens: QuotaTokensOption = None,
    quota_requests: QuotaRequestsOption = None,
    quota_audio_seconds: QuotaAudioOption = None,
    quota_images: QuotaImagesOption = None,
    weight: WeightOption = 1.0,
    home: HomeOption = None,
) -> None:
    """Create a tenant (a team that owns keys), with limits and quotas all its keys share."""
    flags = _quota_flags(quota_tokens, quota_requests, quota_audio_seconds, quota_images)
    with _governance(home) as governance:
        limits = _merged(Limits(), rpm, tpm, max_concurrent, flags)
        tenant = governance.create_tenant(name, description, limits, weight)
    typer.echo(f"created tenant {tenant.name}")


@tenants_app.command("list")
def tenants_list(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """List the tenants and how many active keys each has."""
    with _governance(home) as governance:
        tenants = governance.list_tenants()
        keys = governance.list_keys()
    if as_json:
        typer.echo(json.dumps([_tenant_dict(t) for t in tenants], indent=2))
        return
    now = datetime.now(UTC)
    table = Table("TENANT", "ACTIVE KEYS", "LIMITS", "WEIGHT", "CREATED", "DESCRIPTION")
    table.box = None
    for tenant in tenants:
        active = sum(1 for k in keys if k.tenant == tenant.name and k.status(now) == "active")
        table.add_row(
            tenant.name,
            str(active),
            _limits_text(tenant.limits),
            f"{tenant.weight:g}",
            _when(tenant.created_at),
            escape(tenant.description),
        )
    Console().print(table)


@tenants_app.command("show")
def tenants_show(name: str, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Show a tenant and its keys."""
    with _governance(home) as governance:
        tenant = governance.get_tenant(name)
        keys = governance.list_keys(name)
    if as_json:
        now = datetime.now(UTC)
        data = {**_tenant_dict(tenant), "keys": [_key_dict(k, now) for k in keys]}
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    console.print(
        f"tenant {tenant.name}  created {_when(tenant.created_at)}  "
        f"limits {_limits_text(tenant.limits)}  weight {tenant.weight:g}",
        highlight=False,
    )
    if tenant.description:
        console.print(escape(tenant.description))
    console.print(_keys_table(keys) if keys else "no keys")


@tenants_app.command("limits")
def tenants_limits(
    name: str,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrent: ConcurrentOption = None,
    quota_tokens: QuotaTokensOption = None,
    quota_requests: QuotaRequestsOption = None,
    quota_audio_seconds: QuotaAudioOption = None,
    quota_images: QuotaImagesOption = None,
    home: HomeOption = None,
) -> None:
    """Change the limits and quotas a tenant's keys share (the flags given; 0 removes one)."""
    flags = _quota_flags(quota_tokens, quota_requests, quota_audio_seconds, quota_images)
    with _governance(home) as governance:
        current = governance.get_tenant(name).limits
        merged = _merged(current, rpm, tpm, max_concurrent, flags)
        tenant = governance.set_tenant_limits(name, merged)
    typer.echo(f"tenant {tenant.name}: {_limits_text(tenant.limits)}")


@tenants_app.command("weight")
def tenants_weight(
    name: str,
    weight: Annotated[float, typer.Argument(help="Fair-share weight (default 1).")],
    home: HomeOption = None,
) -> None:
    """Set a tenant's fair-share weight: under contention the engine queues serve tenants in
    proportion to their weights."""
    with _governance(home) as governance:
        tenant = governance.set_tenant_weight(name, weight)
    typer.echo(f"tenant {tenant.name}: weight {tenant.weight:g}")


@tenants_app.command("rm")
def tenants_rm(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    home: HomeOption = None,
) -> None:
    """Delete a tenant and all its keys."""
    with _governance(home) as governance:
        governance.get_tenant(name)
        if not yes:
            typer.confirm(f"delete tenant {name!r} and all its keys?", abort=True)
        governance.delete_tenant(name)
    typer.echo(f"deleted tenant {name}")


# ------------------------------------------------------------------------- keys


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant that owns the key.")],
    scope: Annotated[
        list[str], typer.Option(help="admin, models:read or inference; repeat for several.")
    ],
    models: Annotated[
        list[str] | None,
        typer.Option(help="Model names or globs the key may see (default '*'); repeat or comma."),
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Lifetime: 90s, 15m, 12h, 30d, 2w (default: never).")
    ] = None,
    name: Annotated[str, typer.Option(help="A label for people.")] = "",
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrent: ConcurrentOption = None,
    quota_tokens: QuotaTokensOption = None,
    quota_requests: QuotaRequestsOption = None,
    quota_audio_seconds: QuotaAudioOption = None,
    quota_images: QuotaImagesOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key; its secret goes to stdout, once."""
    flags = _quota_flags(quota_tokens, quota_requests, quota_audio_seconds, quota_images)
    with _governance(home) as governance:
        issued = governance.create_key(
            tenant,
            _split(scope) or [],
            _split(models),
            name=name,
            expires_in=expires_in,
            limits=_merged(Limits(), rpm, tpm, max_concurrent, flags),
        )
    _print_issued(issued, as_json, "created")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """List keys (never their secrets)."""
    with _governance(home) as governance:
        keys = governance.list_keys(tenant)
    if as_json:
        now = datetime.now(UTC)
        typer.echo(json.dumps([_key_dict(k, now) for k in keys], indent=2))
    elif not keys:
        typer.echo("no keys")
    else:
        Console().print(_keys_table(keys))


@keys_app.command("show")
def keys_show(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="<id> or lmaas-<id>.")],
    home: HomeOption = None,
) -> None:
    """Show one key's record as JSON."""
    with _governance(home) as governance:
        key = governance.get_key(key_id)
    typer.echo(json.dumps(_key_dict(key, datetime.now(UTC)), indent=2))


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="<id> or lmaas-<id>.")],
    expires_in: Annotated[
        str | None, typer.Option(help="A new lifetime from now (default: keep the expiry).")
    ] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give a key a new secret (printed once); the old secret stops working."""
    with _governance(home) as governance:
        issued = governance.rotate_key(key_id, expires_in=expires_in)
    _print_issued(issued, as_json, "rotated")


@keys_app.command("limits")
def keys_limits(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="<id> or lmaas-<id>.")],
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrent: ConcurrentOption = None,
    quota_tokens: QuotaTokensOption = None,
    quota_requests: QuotaRequestsOption = None,
    quota_audio_seconds: QuotaAudioOption = None,
    quota_images: QuotaImagesOption = None,
    home: HomeOption = None,
) -> None:
    """Change a key's limits and quotas (the flags given; 0 removes one)."""
    flags = _quota_flags(quota_tokens, quota_requests, quota_audio_seconds, quota_images)
    with _governance(home) as governance:
        current = governance.get_key(key_id).limits
        merged = _merged(current, rpm, tpm, max_concurrent, flags)
        key = governance.set_key_limits(key_id, merged)
    typer.echo(f"{key.prefix}: {_limits_text(key.limits)}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="<id> or lmaas-<id>.")],
    home: HomeOption = None,
) -> None:
    """Revoke a key for good."""
    with _governance(home) as governance:
        key = governance.revoke_key(key_id)
    typer.echo(f"revoked {key.prefix}")
