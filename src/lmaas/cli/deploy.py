"""``lmaas deploy``: deployments, canaries, promotion, rollback and their history.

Like ``lmaas keys``, the command works on the metadata DB directly (``--home`` /
``LMAAS_HOME`` / ``LMAAS_DATABASE_URL``): every change is written with its history and audit
rows in one transaction, and each running gateway on that DB applies it within
``deploy.poll_interval_s`` (1 s by default), draining the replicas that leave.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmaas.bootstrap.deployments import open_deployments
from lmaas.bootstrap.settings import Settings
from lmaas.cli.governance import cli_actor
from lmaas.core.errors import LmaasError
from lmaas.engine.deploy import GateResult
from lmaas.lifecycle.deployments import DeploymentService, DeploymentView
from lmaas.registry.deployments_db import DeploymentChange


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=1)


@contextmanager
def _service(home: Path | None) -> Iterator[tuple[DeploymentService, Settings]]:
    # Imported here: the wiring pulls in the HTTP app (FastAPI), which every other CLI command
    # would otherwise pay for at start-up.
    from lmaas.bootstrap.wiring import open_registry

    try:
        settings = Settings(home=home) if home is not None else Settings()
        registry = open_registry(settings)
    except (LmaasError, ValidationError) as exc:
        _fail(exc.message if isinstance(exc, LmaasError) else str(exc))
    try:
        yield open_deployments(settings, registry), settings
    except LmaasError as exc:
        _fail(exc.message)
    finally:
        registry.close()


def _split(text: str) -> dict[str, int]:
    weights: dict[str, int] = {}
    for part in text.split(","):
        version, sep, weight = part.strip().partition("=")
        if not sep or not weight.strip().isdigit():
            raise typer.BadParameter(f"--split takes VERSION=WEIGHT,...; got {part!r}")
        weights[version.strip()] = int(weight)
    return weights


def deploy_command(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME", help="The served model name (or 'list', or 'history NAME')."
        ),
    ],
    extra: Annotated[
        str | None, typer.Argument(metavar="[NAME]", help="The name after 'history'.")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", "-v", help="Deploy this version (or alias) alone."),
    ] = None,
    canary: Annotated[
        str | None, typer.Option("--canary", help="Start a canary of this version (or alias).")
    ] = None,
    percent: Annotated[
        int, typer.Option("--percent", min=1, max=99, help="Canary share of the traffic.")
    ] = 10,
    promote: Annotated[
        bool, typer.Option("--promote", help="Make the canary stable (through the gate).")
    ] = False,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback", help="Drop the canary; without one, back to the previous stable."
        ),
    ] = False,
    replicas: Annotated[
        int | None,
        typer.Option(
            "--replicas", min=1, help="Worker processes (of --version, --canary, or stable)."
        ),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Explicit weights: VERSION=WEIGHT,... (=100).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Promote even when the gate refuses.")
    ] = False,
    max_drop: Annotated[
        float | None,
        typer.Option("--max-drop", min=0.0, help="The gate's margin (default: the setting)."),
    ] = None,
    stop: Annotated[
        bool,
        typer.Option(
            "--stop", help="Stop serving NAME: servers drain and stop its replicas (history kept)."
        ),
    ] = False,
    history: Annotated[bool, typer.Option("--history", help="Show every change.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Recorded in the history.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="lmaas home directory (default: $LMAAS_HOME or ~/.lmaas)."),
    ] = None,
) -> None:
    """Route a served model's traffic between versions: canary, promote, roll back, scale.

    \b
      lmaas deploy NAME                          show the deployment
      lmaas deploy NAME --version 3 [--replicas 2]
      lmaas deploy NAME --canary 4 --percent 10  4 gets 10% beside the stable version
      lmaas deploy NAME --promote                4 becomes stable (refused by the gate when
                                                 its stored evaluation is worse)
      lmaas deploy NAME --rollback               all traffic back to the stable version
      lmaas deploy NAME --split 3=50,4=50
      lmaas deploy NAME --replicas 3             scale the stable version
      lmaas deploy NAME --stop                   stop serving NAME (--version V serves it again)
      lmaas deploy history NAME   (or NAME --history)
      lmaas deploy list

    Running servers on the same DB apply a change within a second; leaving replicas drain.
    A server started without --model also starts serving names deployed while it runs.
    """
    if name == "history" and extra is not None:
        name, history = extra, True
    elif extra is not None:
        raise typer.BadParameter(f"unexpected argument {extra!r}")
    actions = [version is not None, canary is not None, promote, rollback, split is not None, stop]
    if sum(actions) > 1:
        raise typer.BadParameter(
            "give one of --version, --canary, --promote, --rollback, --split or --stop"
        )
    with _service(home) as (service, settings):
        if name == "list" and not any(actions) and replicas is None:
            _print_list(service.list_all(), as_json)
            return
        if history:
            _print_history(name, service.history(name), as_json)
            return
        gate: GateResult | None = None
        actor = cli_actor()
        if stop:
            change = service.stop(name, actor=actor, reason=reason)
            if as_json:
                typer.echo(json.dumps(change.to_dict(), indent=2))
                return
            Console().print(
                f"[bold]{escape(name)}[/] stopped (revision {change.revision}); running servers "
                f"drain and stop its replicas within {settings.deploy.poll_interval_s:g} s"
            )
            return
        if version is not None:
            service.set_version(name, version, replicas=replicas, actor=actor, reason=reason)
        elif canary is not None:
            service.canary(name, canary, percent, replicas=replicas, actor=actor, reason=reason)
        elif promote:
            _, gate = service.promote(
                name, actor=actor, force=force, max_drop=max_drop, reason=reason
            )
        elif rollback:
            service.rollback(name, actor=actor, reason=reason)
        elif split is not None:
            service.set_weights(name, _split(split), actor=actor, reason=reason)
        elif replicas is not None:
            service.scale(name, replicas, actor=actor, reason=reason)
        view = service.get(name)
        changed = any(actions) or replicas is not None
        if as_json:
            body = view.to_dict()
            if gate is not None:
                body["gate"] = gate.to_dict()
            typer.echo(json.dumps(body, indent=2))
            return
        _print_view(view, gate)
        if changed:
            Console().print(
                f"[dim]running servers apply revision {view.revision} within "
                f"{settings.deploy.poll_interval_s:g} s[/]"
            )


def _print_view(view: DeploymentView, gate: GateResult | None) -> None:
    console = Console()
    spec = view.spec
    console.print(
        f"[bold]{spec.name}[/] revision {view.revision} (by {escape(view.updated_by)}, "
        f"{view.updated_at:%Y-%m-%d %H:%M:%S})"
    )
    table = Table("VERSION", "ROLE", "WEIGHT", "REPLICAS")
    for t in spec.targets:
        role = (
            "stable" if t.version == spec.stable else "canary" if t.version == spec.canary else ""
        )
        table.add_row(t.version, role, f"{t.weight}%", str(t.replicas))
    console.print(table)
    if gate is not None:
        for metric, digest, split, old, new in gate.compared:
            where = f"{digest[:12]}" + (f"/{split}" if split else "")
            console.print(f"  gate: {metric} on {where}: {old:.4f} -> {new:.4f}")


def _print_list(views: list[DeploymentView], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in views], indent=2))
        return
    table = Table("NAME", "REVISION", "STABLE", "CANARY", "SPLIT", "UPDATED")
    for view in views:
        spec = view.spec
        weights = ", ".join(f"{t.version}={t.weight}%x{t.replicas}" for t in spec.targets)
        table.add_row(
            spec.name,
            str(view.revision),
            spec.stable,
            spec.canary or "-",
            weights,
            f"{view.updated_at:%Y-%m-%d %H:%M}",
        )
    Console().print(table)


def _print_history(name: str, changes: list[DeploymentChange], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([c.to_dict() for c in changes], indent=2))
        return
    table = Table("WHEN", "REV", "ACTION", "SPLIT", "BY", "REASON", title=f"deployment {name}")
    for change in changes:
        table.add_row(
            f"{change.changed_at:%Y-%m-%d %H:%M:%S}",
            str(change.revision),
            change.action,
            _weights(change.spec),
            escape(change.actor),
            escape(change.reason),
        )
    Console().print(table)


def _weights(spec: dict[str, Any]) -> str:
    return ", ".join(f"{t['version']}={t['weight']}%" for t in spec.get("targets", []))
