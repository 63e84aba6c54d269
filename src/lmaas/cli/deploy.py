"""``lmaas deploy``: deployments, canaries, promotion, rollback and their history.

Like ``lmaas keys``, the command works on the metadata DB directly (``--home`` /
``LMAAS_HOME`` / ``LMAAS_DATABASE_URL``): every change is written with its history and audit
rows in one transaction, and each running gateway on that DB applies it within
``deploy.poll_interval_s`` (1 s by default), draining the replicas that leave.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmaas.bootstrap.deployments import open_deployments
from lmaas.bootstrap.settings import Settings
from lmaas.cli.common import fail, load_settings
from lmaas.cli.governance import cli_actor
from lmaas.core.errors import LmaasError
from lmaas.engine.deploy import GateResult
from lmaas.lifecycle.deployments import (
    FLEET_FRESH_FACTOR,
    DeploymentService,
    DeploymentView,
    FleetStatus,
    describe_retry,
)
from lmaas.registry.deployments_db import DeploymentChange


@contextmanager
def _service(home: Path | None) -> Iterator[tuple[DeploymentService, Settings]]:
    # Imported here: the wiring pulls in the HTTP app (FastAPI), which every other CLI command
    # would otherwise pay for at start-up.
    from lmaas.bootstrap.wiring import open_registry

    try:
        settings = load_settings(home)
        registry = open_registry(settings)
    except LmaasError as exc:
        fail(exc.message)
    try:
        yield open_deployments(settings, registry), settings
    except LmaasError as exc:
        fail(exc.message)
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
            metavar="NAME",
            help="The served model name (or 'list', 'history NAME', 'status NAME').",
        ),
    ],
    extra: Annotated[
        str | None,
        typer.Argument(metavar="[NAME]", help="The name after 'history' or 'status'."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version", "-v", help="Deploy this version (an alias is resolved once) alone."
        ),
    ] = None,
    follow_alias: Annotated[
        str | None,
        typer.Option(
            "--follow-alias",
            help="Deploy the version this alias names, and again each time it is moved.",
        ),
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
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait until every running server serving NAME has applied the change "
            "(replicas ready); exit 1 on a load failure, 2 on timeout.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.0, help="Seconds --wait waits at most.")
    ] = 300.0,
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
      lmaas deploy NAME --version 3 [--replicas 2] [--wait]
      lmaas deploy NAME --follow-alias production   follow the alias's moves
      lmaas deploy NAME --canary 4 --percent 10  4 gets 10% beside the stable version
      lmaas deploy NAME --promote                4 becomes stable (refused by the gate when
                                                 its stored evaluation is worse)
      lmaas deploy NAME --rollback               all traffic back to the stable version
      lmaas deploy NAME --split 3=50,4=50
      lmaas deploy NAME --replicas 3             scale the stable version
      lmaas deploy NAME --stop                   stop serving NAME (--version V serves it again)
      lmaas deploy history NAME   (or NAME --history)
      lmaas deploy status NAME    what each running server has applied ([--wait])
      lmaas deploy list

    Running servers on the same DB apply a change within a second; leaving replicas drain.
    --wait returns once they all route the new revision with its replicas ready.
    A server started without --model also starts serving names deployed while it runs.
    """
    status = False
    if name == "history" and extra is not None:
        name, history = extra, True
    elif name == "status" and extra is not None:
        name, status = extra, True
    elif extra is not None:
        raise typer.BadParameter(f"unexpected argument {extra!r}")
    actions = [
        version is not None,
        follow_alias is not None,
        canary is not None,
        promote,
        rollback,
        split is not None,
        stop,
    ]
    if sum(actions) > 1:
        raise typer.BadParameter(
            "give one of --version, --follow-alias, --canary, --promote, --rollback, --split "
            "or --stop"
        )
    with _service(home) as (service, settings):
        if status:
            fleet = (
                _wait(service, settings, name, timeout) if wait else _fleet(service, settings, name)
            )
            if as_json:
                typer.echo(json.dumps(fleet.to_dict(), indent=2))
            else:
                _print_fleet(fleet)
            return
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
            else:
                Console().print(
                    f"[bold]{escape(name)}[/] stopped (revision {change.revision}); running "
                    f"servers drain and stop its replicas within "
                    f"{settings.deploy.poll_interval_s:g} s"
                )
            if wait:
                _wait(service, settings, name, timeout)
            return
        if version is not None:
            service.set_version(name, version, replicas=replicas, actor=actor, reason=reason)
        elif follow_alias is not None:
            service.follow_alias(name, follow_alias, replicas=replicas, actor=actor, reason=reason)
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
        else:
            _print_view(view, gate)
            if changed and not wait:
                Console().print(
                    f"[dim]running servers apply revision {view.revision} within "
                    f"{settings.deploy.poll_interval_s:g} s (--wait waits for them)[/]"
                )
        if wait:
            _wait(service, settings, name, timeout)


def _fleet(service: DeploymentService, settings: Settings, name: str) -> FleetStatus:
    return service.fleet(name)


def _wait(
    service: DeploymentService, settings: Settings, name: str, timeout_s: float
) -> FleetStatus:
    """Wait until every live server serving ``name`` has applied its current revision (or its
    stop), printing each server's progress as it changes (on stderr: --json keeps stdout).

    Exits 1 when a server could not apply it (its load error), 2 on timeout."""
    console = Console(stderr=True, highlight=False)
    started = time.monotonic()
    shown: dict[str, str] = {}
    while True:
        fleet = _fleet(service, settings, name)
        goal = "stop serving" if fleet.stopped else f"apply revision {fleet.revision} of"
        for gateway in fleet.gateways:
            line = gateway.describe()
            if shown.get(gateway.gateway) != line:
                shown[gateway.gateway] = line
                console.print(f"  {escape(line)}", soft_wrap=True)
        if fleet.errors:
            fail(f"servers could not {goal} {name}: " + "; ".join(fleet.errors))
        elapsed = time.monotonic() - started
        if not fleet.gateways:
            console.print(
                f"no running server serves {escape(name)} (none reported in the last "
                f"{FLEET_FRESH_FACTOR * settings.deploy.fleet_heartbeat_s:g} s): "
                "nothing to wait for"
            )
            return fleet
        if fleet.done:
            console.print(
                f"[green]{len(fleet.gateways)} server(s)[/] did {goal} {escape(name)} "
                f"in {elapsed:.1f} s"
            )
            return fleet
        if elapsed >= timeout_s:
            pending = [g.describe() for g in fleet.gateways if not g.done]
            fail(
                f"timed out after {timeout_s:g} s waiting for the servers to {goal} {name}; "
                "still: " + "; ".join(pending),
                code=2,
            )
        time.sleep(min(0.5, settings.deploy.poll_interval_s))


def _print_fleet(fleet: FleetStatus) -> None:
    goal = "stopped" if fleet.stopped else f"revision {fleet.revision}"
    table = Table(
        "SERVER", "REVISION", "VERSIONS (ready/wanted)", "STATE", title=f"{fleet.name}: {goal}"
    )
    for g in fleet.gateways:
        versions = ", ".join(f"{v} {r}/{w}" for v, (r, w) in g.versions.items())
        state = (
            "failed: " + g.error + describe_retry(g.retry)
            if g.error
            else "done"
            if g.done
            else "applying"
        )
        table.add_row(escape(g.gateway), str(g.revision), versions or "-", escape(state))
    Console().print(table)
    if not fleet.gateways:
        Console().print("no running server serves it")


def _print_view(view: DeploymentView, gate: GateResult | None) -> None:
    console = Console()
    spec = view.spec
    console.print(
        f"[bold]{spec.name}[/] revision {view.revision} (by {escape(view.updated_by)}, "
        f"{view.updated_at:%Y-%m-%d %H:%M:%S})"
    )
    if spec.follow is not None:
        console.print(f"follows {escape(spec.name)}@{escape(spec.follow)}")
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
