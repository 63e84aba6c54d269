"""The ``lmaas`` command: thin typer commands over bootstrap and the services."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from lmaas import __version__
from lmaas.bootstrap.settings import Settings
from lmaas.cli.bench import bench_app
from lmaas.cli.common import load_settings
from lmaas.cli.deploy import deploy_command
from lmaas.cli.evaluate import eval_command
from lmaas.cli.governance import keys_app, tenants_app
from lmaas.cli.lifecycle import compress_command, convert_command, train_app
from lmaas.cli.usage_audit import audit_app, usage
from lmaas.cli.versions import models_app
from lmaas.core.errors import LmaasError
from lmaas.core.types import ModelState, Task
from lmaas.engine.local import Deployment, LocalEngineClient

app = typer.Typer(
    no_args_is_help=True,
    help="lmaas: large models as a service. Serve models through the OpenAI and Open Inference "
    "Protocol v2 APIs, and manage them in a local model store.",
)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(train_app, name="train")
app.command("compress")(compress_command)
app.command("convert")(convert_command)
app.command("eval")(eval_command)
app.command("deploy")(deploy_command)
app.add_typer(audit_app, name="audit")
app.command("usage")(usage)
_err = Console(stderr=True)


def _settings(home: Path | None, no_auth: bool = False, **server: object) -> Settings:
    base = load_settings()
    update: dict[str, object] = {}
    if home is not None:
        update["home"] = home
    changes = {k: v for k, v in server.items() if v is not None}
    if changes:
        update["server"] = base.server.model_copy(update=changes)
    if no_auth:
        update["auth"] = base.auth.model_copy(update={"enabled": False})
    return base.model_copy(update=update)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    home: Annotated[
        Path | None, typer.Option(help="Model store and DB (default $LMAAS_HOME or ~/.lmaas).")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="A registered NAME, NAME:VERSION or NAME@ALIAS, or a path to import; repeat "
            "for several. Clients may then call the model as NAME, NAME:VERSION or NAME@ALIAS. "
            "The server then serves exactly these names (following their deployments). "
            "Default: the whole store: every registered model (or the demo models on an empty "
            "store), and every name deployed with `lmaas deploy` while it runs.",
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None, typer.Option(help="Seconds in-flight requests may take on SIGTERM.")
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Serve without API keys; refused unless --host is a loopback address.",
        ),
    ] = False,
) -> None:
    """Start the gateway and one worker process per served model.

    Every route but the health probes needs an API key. On the first start lmaas creates an
    admin key and prints it once.
    """
    from lmaas.bootstrap.deployments import open_deployments, plan_serving
    from lmaas.bootstrap.governance import (
        announce_admin_key,
        check_auth_binding,
        open_governance,
        open_usage_meter,
    )
    from lmaas.bootstrap.server import bind_socket, run_gateway
    from lmaas.bootstrap.wiring import (
        DeploymentWiring,
        build_gateway,
        deployment_for,
        open_registry,
        resolve_models,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(home, no_auth, host=host, port=port, drain_timeout_s=drain_timeout)
    try:
        check_auth_binding(settings)
        governance = open_governance(settings)
        meter = open_usage_meter(settings)
        issued = governance.bootstrap_admin_key() if settings.auth.enabled else None
        if issued is not None:
            announce_admin_key(issued, lambda text: print(text, file=sys.stderr, flush=True))
        registry = open_registry(settings, governance)
        manifests = resolve_models(registry, model or [], lambda m: _err.print(f"[dim]{m}[/]"))
        service = open_deployments(settings, registry)

        def version_deployment(name: str, version: str) -> Deployment:
            return deployment_for(registry, registry.get(name, version), settings)

        plan = plan_serving(service, manifests, model or [], version_deployment)
        names = [m.name for m in manifests] if model else None  # None: the whole store
        deploy = DeploymentWiring(service, plan, version_deployment, names)
        sock = bind_socket(settings.server.host, settings.server.port)
    except (LmaasError, OSError) as exc:
        _fail(exc)
    url_host = (
        settings.server.host if ":" not in settings.server.host else f"[{settings.server.host}]"
    )
    base_url = f"http://{url_host}:{sock.getsockname()[1]}"

    auth = settings.auth.enabled
    gateway = build_gateway(
        settings,
        plan.deployments,
        on_ready=lambda engine: _print_banner(base_url, engine, auth),
        governance=governance,
        aliases=registry.alias_target,
        meter=meter,
        deploy=deploy,
        registry=registry,
    )
    run_gateway(gateway, settings, sock)


def _print_banner(base_url: str, engine: LocalEngineClient, auth: bool) -> None:
    console = Console()
    key_header = ' -H "Authorization: Bearer $LMAAS_API_KEY"' if auth else ""
    console.print(f"\n[bold green]lmaas {__version__} is serving at {base_url}[/]")
    for served in engine.list_models():
        note = f" ({served.error})" if served.error else ""
        console.print(
            f"  {served.name}:{served.version}  {served.task.value}  {served.state.value}{note}"
        )
    ready = [m for m in engine.list_models() if m.state is ModelState.READY]
    chat = next((m for m in ready if m.task is Task.CHAT), None)
    embed = next((m for m in ready if m.task is Task.EMBEDDING), None)
    if chat is not None:
        console.print("\nTry it:")
        console.print(
            f"curl {base_url}/v1/chat/completions{key_header} -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{chat.name}", "messages": [{{"role": "user", '
            f'"content": "Hello!"}}], "max_tokens": 16}}\'',
            soft_wrap=True,
        )
    if embed is not None:
        console.print(
            f"curl {base_url}/v1/embeddings{key_header} -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{embed.name}", "input": "Large models as a service"}}\'',
            soft_wrap=True,
        )
    if auth:
        console.print(
            "\nEvery route but the health probes needs an API key: export LMAAS_API_KEY=<key> "
            "(the admin key printed on the first start, or one from `lmaas keys create`)."
        )
    else:
        console.print("\n[yellow]Authentication is OFF (--no-auth, loopback only).[/]")
    console.print(f"\nOpenAPI: {base_url}/docs   metrics: {base_url}/metrics\n")


def _fail(exc: BaseException) -> NoReturn:
    message = exc.message if isinstance(exc, LmaasError) else str(exc)
    _err.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the lmaas version."""
    typer.echo(__version__)


def main() -> None:
    app()
