"""``lmaas usage`` and ``lmaas audit``: usage aggregates and the audit trail, read from the
metadata DB directly (``--home`` / ``LMAAS_HOME`` / ``LMAAS_DATABASE_URL``), over the same
store and service as ``/admin/usage`` and ``/admin/audit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lmaas.bootstrap.settings import Settings
from lmaas.cli.common import fail, load_settings
from lmaas.cli.governance import HomeOption, JsonOption, _governance
from lmaas.core.errors import LmaasError
from lmaas.gateway.usage_store import (
    GROUP_BY_FIELDS,
    USAGE_COLUMNS,
    SqlUsageStore,
    usage_csv,
    usage_query,
)

audit_app = typer.Typer(
    help="The audit trail of admin actions: list it, verify its hash chain.",
    no_args_is_help=True,
)


def _settings(home: Path | None) -> Settings:
    return load_settings(home)


def usage(
    group_by: Annotated[
        list[str] | None,
        typer.Option(
            "--group-by",
            "-g",
            help=f"Group by (repeat or comma-separate): {', '.join(GROUP_BY_FIELDS)}. "
            "Default: day,tenant,model.",
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this ISO date/time (UTC), inclusive.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to this ISO date/time (UTC), exclusive.")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    output: Annotated[
        str, typer.Option("--format", "-f", help="table (default), json or csv.")
    ] = "table",
    home: HomeOption = None,
) -> None:
    """Usage aggregated by tenant / key / model / day: requests, tokens, audio, images."""
    if output not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {output!r}")
    settings = _settings(home)
    try:
        query = usage_query(group_by, since, until, tenant, key, model)
        store = SqlUsageStore(settings.resolved_database_url())
    except LmaasError as exc:
        fail(exc.message)
    try:
        rows = store.aggregate(query)
    finally:
        store.close()
    if output == "json":
        print(json.dumps({"group_by": list(query.group_by), "data": rows}, indent=2))
    elif output == "csv":
        print(usage_csv(rows, query.group_by), end="")
    else:
        Console().print(_usage_table(rows, list(query.group_by)))


def _usage_table(rows: list[dict[str, Any]], group_by: list[str]) -> Table:
    table = Table(title="usage")
    shown = [c for c in USAGE_COLUMNS if c not in ("prompt_tokens", "completion_tokens")]
    shown = ["requests", "prompt_tokens", "completion_tokens", *shown[1:]]
    for column in [*group_by, *shown]:
        table.add_column(column, justify="left" if column in group_by else "right")
    for row in rows:
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in [*group_by, *shown]))
    return table


@audit_app.command("list")
def audit_list(
    limit: Annotated[int, typer.Option(help="How many rows (newest first).")] = 50,
    actor: Annotated[str | None, typer.Option(help="Only this actor.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (key.create...).")] = None,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """The latest admin actions: who did what to which tenant or key, and when."""
    with _governance(home) as governance:
        rows = governance.list_audit(limit=limit, actor=actor, action=action, target=target)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    table = Table(title="audit trail")
    for column in ("seq", "at", "actor", "action", "target", "change"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.seq),
            row.at[:19],
            row.actor,
            row.action,
            row.target,
            _change(row.before, row.after),
        )
    Console().print(table)


def _change(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    if before is None:
        return "created"
    if after is None:
        return "deleted"
    changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
    return ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in changed) or "-"


@audit_app.command("verify")
def audit_verify(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Walk the hash chain; exit 1 naming the first row edited, deleted or forged."""
    with _governance(home) as governance:
        report = governance.verify_audit()
    if as_json:
        print(json.dumps(report.to_dict()))
    elif report.ok:
        Console().print(f"[green]audit trail intact[/green]: {report.rows} rows verified")
    else:
        Console(stderr=True).print(
            f"[red]audit trail BROKEN[/red] at row {report.first_broken_seq}: {report.reason}"
        )
    if not report.ok:
        raise typer.Exit(code=1)
