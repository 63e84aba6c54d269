"""``lmaas models``: import, list, show and remove model versions (thin over RegistryService)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from sqlalchemy.orm import Session

from lmaas.bootstrap.deployments import audit_deployment_change
from lmaas.cli.common import load_settings
from lmaas.cli.governance import cli_actor
from lmaas.core.errors import LmaasError
from lmaas.core.types import Task
from lmaas.gateway.audit import alias_move_entry, append_audit
from lmaas.lifecycle.deployments import alias_follower, chain_alias_hooks
from lmaas.registry.lifecycle_db import AliasMove
from lmaas.registry.manifest import Lineage, Manifest
from lmaas.registry.service import RegistryService

models_app = typer.Typer(
    help="Import, list, show and remove model versions in the local store.",
    no_args_is_help=True,
)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="lmaas home directory (default: $LMAAS_HOME or ~/.lmaas)."),
]


class RichImportProgress:
    """An :class:`~lmaas.registry.service.ImportProgress` drawn as a rich progress bar."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task: TaskID | None = None

    def start(self, total_bytes: int, description: str) -> None:
        """Show the bar."""
        self._progress.start()
        self._task = self._progress.add_task(description, total=total_bytes)

    def advance(self, num_bytes: int) -> None:
        """Move the bar."""
        if self._task is not None:
            self._progress.advance(self._task, num_bytes)

    def finish(self) -> None:
        """Remove the bar."""
        self._progress.stop()


def _audited(session: Session, move: AliasMove) -> None:
    """The registry's alias-move hook for the CLI: each move's audit row is appended in the
    move's own transaction (actor ``cli:<os user>`` when the move names none)."""
    append_audit(session, alias_move_entry(move, cli_actor()))


@contextmanager
def _registry(home: Path | None) -> Iterator[RegistryService]:
    """Open the registry of ``home``; any LmaasError becomes one red line and exit code 1."""
    stderr = Console(stderr=True)
    settings = load_settings(home)
    try:
        service = RegistryService(
            settings.home,
            settings.resolved_database_url(),
            offline=settings.offline,
            alias_audit=chain_alias_hooks(
                alias_follower(audit_deployment_change, cli_actor()), _audited
            ),
        )
    except LmaasError as exc:
        _fail(stderr, str(exc))
    try:
        yield service
    except LmaasError as exc:
        _fail(stderr, exc.message)
    finally:
        service.close()


def _fail(console: Console, message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=1)


def _format_bytes(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{num_bytes} B"


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, sep, version = ref.partition(":")
    return name, (version if sep else None)


@models_app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(help="Model directory, .onnx file, or hub id.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: from source).")] = None,
    task: Annotated[Task | None, typer.Option(help="Task (default: inferred).")] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept pickle weights (.bin, .pt, .pkl).")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Accept models that ship Python code.")
    ] = False,
    description: Annotated[str | None, typer.Option(help="Free text for the manifest.")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="serving.backend: auto, torch or onnxruntime (default: auto)."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="A serving option KEY=VALUE (repeatable), e.g. quantize=int8."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(help="Lineage: the NAME:VERSION this model was made from."),
    ] = None,
    transform: Annotated[
        str | None, typer.Option(help="Lineage: what was done to the parent (e.g. fine-tune).")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Lineage: a transform parameter KEY=VALUE (repeatable)."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Import a model as the next version of its name."""
    serving = _serving_overrides(backend, option or [])
    lineage = _lineage(parent, transform, param or [])
    with _registry(home) as registry:
        manifest = registry.import_model(
            source,
            name=name,
            task=task,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            description=description,
            serving=serving,
            lineage=lineage,
            progress=RichImportProgress(Console(stderr=True)),
        )
        where = registry.model_dir(manifest)
    typer.echo(
        f"imported {manifest.ref} ({manifest.task.value}, {manifest.format.value}, "
        f"{_format_bytes(manifest.size_bytes)}) into {where}"
    )


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` command-line items as a dict.

    Raises:
        typer.BadParameter: An item has no ``=`` or no key.
    """
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (key, sep, _) in zip(items, pairs, strict=True) if not sep or not key]
    if bad:
        raise typer.BadParameter(f"{flag} must look like KEY=VALUE, got {bad[0]!r}")
    return {key: value for key, _, value in pairs}


def _lineage(parent: str | None, transform: str | None, params: list[str]) -> Lineage | None:
    if parent is None:
        if transform is not None or params:
            raise typer.BadParameter("--transform and --param need --parent NAME:VERSION")
        return None
    try:
        return Lineage(
            parent=parent,
            transform=transform or "import",
            parameters=parse_pairs(params, "--param"),
        )
    except ValidationError as exc:
        raise typer.BadParameter(f"--parent: {exc.errors()[0]['msg']}") from None


def _serving_overrides(backend: str | None, options: list[str]) -> dict[str, Any] | None:
    serving: dict[str, Any] = {}
    if backend is not None:
        serving["backend"] = backend
    pairs = [item.partition("=") for item in options]
    bad = [key for key, sep, _ in pairs if not sep or not key]
    if bad:
        raise typer.BadParameter(f"--option must look like KEY=VALUE, got {bad[0]!r}")
    if pairs:
        serving["options"] = {key: value for key, _, value in pairs}
    return serving or None


def _table(manifests: list[Manifest]) -> Table:
    table = Table("NAME", "VERSION", "TASK", "FORMAT", "SIZE", "CREATED", box=None)
    for m in manifests:
        created = m.created_at.strftime("%Y-%m-%d %H:%M")
        size = _format_bytes(m.size_bytes)
        table.add_row(m.name, m.version, m.task.value, m.format.value, size, created)
    return table


@models_app.command("list")
def list_command(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every imported version."""
    with _registry(home) as registry:
        manifests = registry.list_models()
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
    elif not manifests:
        typer.echo("no models imported yet; try `lmaas models import DIR`")
    else:
        Console().print(_table(manifests))


@models_app.command("show")
def show_command(
    ref: Annotated[
        str, typer.Argument(metavar="NAME[:VERSION|@ALIAS]", help="Latest if no version.")
    ],
    manifest_only: Annotated[
        bool, typer.Option("--manifest-only", help="Print lmaas.yaml only.")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Print a version's manifest (lmaas.yaml), then its aliases, tags and stored metrics."""
    with _registry(home) as registry:
        manifest = registry.resolve(ref)
        state = _registry_state(registry, manifest)
    typer.echo(manifest.to_yaml(), nl=False)
    if not manifest_only:
        typer.echo("# registry state (changes after import; not part of lmaas.yaml):")
        typer.echo(yaml.safe_dump({"registry": state}, sort_keys=False), nl=False)


def _registry_state(registry: RegistryService, manifest: Manifest) -> dict[str, Any]:
    aliases = sorted(a for a, v in registry.aliases(manifest.name).items() if v == manifest.version)
    metrics = [
        {
            "metric": m.metric,
            "value": m.value,
            "dataset": m.dataset,
            "dataset_digest": m.dataset_digest,
            "split": m.split,
            "num_examples": m.num_examples,
            "measured_at": m.measured_at.isoformat(),
        }
        for m in registry.metrics(manifest)
    ]
    return {"aliases": aliases, "tags": registry.tags(manifest), "metrics": metrics}


@models_app.command("rm")
def rm_command(
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION]", help="All versions if none.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    home: HomeOption = None,
) -> None:
    """Remove one version, or every version of a model."""
    name, version = _split_ref(ref)
    with _registry(home) as registry:
        target = registry.get(name, version)  # fails early on an unknown model
        if not yes:
            what = target.ref if version else f"every version of {name!r}"
            typer.confirm(f"remove {what}?", abort=True)
        removed = registry.remove(name, version)
    for manifest in removed:
        typer.echo(f"removed {manifest.ref}")
