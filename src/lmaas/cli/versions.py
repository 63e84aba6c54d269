"""``lmaas models alias | unalias | tag | history | compare``: the mutable side of versions.

Adds its commands to :data:`lmaas.cli.models.models_app`; import ``models_app`` from here to get
the whole group.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lmaas.cli.governance import cli_actor
from lmaas.cli.models import HomeOption, _registry, models_app, parse_pairs
from lmaas.registry.lifecycle_db import StoredMetric
from lmaas.registry.manifest import Manifest

__all__ = ["models_app"]

CLI_ACTOR = cli_actor()
"""Who the history (and the audit trail) records for moves made from this command line:
``cli:<os user>``, as for every other change made from the CLI."""


@models_app.command("alias")
def alias_command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. production or staging.")],
    version: Annotated[str, typer.Argument(help="The version the alias will name.")],
    home: HomeOption = None,
) -> None:
    """Point NAME@ALIAS at VERSION (atomic; recorded in the history)."""
    with _registry(home) as registry:
        move = registry.set_alias(name, alias, version, actor=CLI_ACTOR)
    was = f" (was {move.previous_version})" if move.previous_version else ""
    typer.echo(f"{name}@{alias} -> {name}:{version}{was}")


@models_app.command("unalias")
def unalias_command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="The alias to remove.")],
    home: HomeOption = None,
) -> None:
    """Remove NAME@ALIAS (recorded in the history)."""
    with _registry(home) as registry:
        move = registry.remove_alias(name, alias, actor=CLI_ACTOR)
    typer.echo(f"removed {name}@{alias} (was {move.previous_version})")


@models_app.command("tag")
def tag_command(
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION|@ALIAS]")],
    tags: Annotated[
        list[str] | None, typer.Argument(help="KEY=VALUE tags to set (KEY= for a label).")
    ] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", "-r", help="A tag key to delete.")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Set or remove tags of a version, and print its tags."""
    pairs = parse_pairs(tags or [], "a tag")
    with _registry(home) as registry:
        manifest = registry.set_tags(ref, pairs, remove or [])
        current = registry.tags(manifest)
    shown = " ".join(f"{k}={v}" if v else k for k, v in current.items()) or "(no tags)"
    typer.echo(f"{manifest.ref}: {shown}")


@models_app.command("history")
def history_command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: HomeOption = None,
) -> None:
    """Which version each alias named, and when (oldest first)."""
    with _registry(home) as registry:
        moves = registry.history(name)
        versions = registry.list_models()
    if as_json:
        rows = [
            {
                "alias": m.alias,
                "version": m.version,
                "previous_version": m.previous_version,
                "moved_at": m.moved_at.isoformat(),
                "actor": m.actor,
            }
            for m in moves
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("WHEN (UTC)", "ALIAS", "FROM", "TO", "BY", title=f"{name}: alias history")
    for m in moves:
        when = m.moved_at.strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, m.alias, m.previous_version or "-", m.version or "(removed)", m.actor)
    console = Console()
    console.print(table)
    imported = [v for v in versions if v.name == name]
    if imported:
        console.print(_versions_table(name, imported))


def _versions_table(name: str, manifests: list[Manifest]) -> Table:
    table = Table("VERSION", "CREATED (UTC)", "LINEAGE", title=f"{name}: versions")
    for m in manifests:
        lineage = "-"
        if m.lineage is not None:
            params = ", ".join(f"{k}={v}" for k, v in m.lineage.parameters.items())
            lineage = f"{m.lineage.parent} --{m.lineage.transform}--> " + (params or "")
        table.add_row(m.version, m.created_at.strftime("%Y-%m-%d %H:%M:%S"), lineage.strip())
    return table


@models_app.command("compare")
def compare_command(
    a: Annotated[str, typer.Argument(metavar="A", help="NAME[:VERSION|@ALIAS]")],
    b: Annotated[str, typer.Argument(metavar="B", help="NAME[:VERSION|@ALIAS]")],
    home: HomeOption = None,
) -> None:
    """Print the stored metrics of two versions side by side (latest result per data set)."""
    with _registry(home) as registry:
        left, right = registry.resolve(a), registry.resolve(b)
        left_metrics = _latest(registry.metrics(left))
        right_metrics = _latest(registry.metrics(right))
    keys = sorted(set(left_metrics) | set(right_metrics))
    if not keys:
        typer.echo(f"neither {left.ref} nor {right.ref} has stored metrics; run `lmaas eval`")
        return
    table = Table("METRIC", "DATASET", "SPLIT", left.ref, right.ref, "DELTA")
    for key in keys:
        lv, rv = left_metrics.get(key), right_metrics.get(key)
        delta = f"{rv - lv:+.4f}" if lv is not None and rv is not None else ""
        metric, digest, split = key
        table.add_row(metric, digest[:12], split or "-", _fmt(lv), _fmt(rv), delta)
    Console().print(table)


def _latest(metrics: list[StoredMetric]) -> dict[tuple[str, str, str], float]:
    latest: dict[tuple[str, str, str], float] = {}
    for m in metrics:  # oldest first: later results overwrite earlier ones
        latest[(m.metric, m.dataset_digest, m.split)] = m.value
    return latest


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
