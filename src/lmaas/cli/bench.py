"""``lmaas bench``: benchmark clients (thin over :mod:`lmaas.bench`)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmaas.bench import BenchConfig, BenchResult, result_table, run_benchmark, write_json
from lmaas.bench.metrics import RequestOutcome
from lmaas.bench.serve import CLIENTS, ClientKind
from lmaas.core.errors import InvalidRequestError, LmaasError

bench_app = typer.Typer(
    help="Benchmark clients for OpenAI-compatible servers.", no_args_is_help=True
)


@bench_app.command("serve")
def serve_command(
    base_url: Annotated[str, typer.Option(help="Server root, e.g. http://127.0.0.1:8000.")],
    model: Annotated[str, typer.Option(help="The model name to send.")],
    endpoint: Annotated[
        str, typer.Option(help="/v1/completions or /v1/chat/completions.")
    ] = "/v1/completions",
    num_prompts: Annotated[int, typer.Option(help="Measured requests.")] = 64,
    input_len: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 128,
    output_len: Annotated[int, typer.Option(help="max_tokens of every request.")] = 128,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Most requests in flight (default: no limit).")
    ] = None,
    request_rate: Annotated[
        float, typer.Option(help="Requests/s with Poisson arrivals; inf sends all at once.")
    ] = math.inf,
    burstiness: Annotated[
        float, typer.Option(help="Gamma shape of the arrival gaps (1 = Poisson).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seeds prompts and arrivals.")] = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Directory with tokenizer.json: exact text prompts.")
    ] = None,
    vocab_size: Annotated[
        int, typer.Option(help="Without --tokenizer: prompt ids are drawn from 0 to N-1.")
    ] = 32000,
    warmup: Annotated[int, typer.Option(help="Unmeasured requests sent first.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.0,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos: true.")] = True,
    api_key: Annotated[str | None, typer.Option(help="Bearer token.")] = None,
    timeout: Annotated[float, typer.Option(help="Read timeout per request, seconds.")] = 600.0,
    extra_body: Annotated[
        str | None, typer.Option(help="JSON object merged into every request body.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON (vLLM's keys).")
    ] = None,
    client: Annotated[
        str,
        typer.Option(
            help="HTTP client: raw (default; plain http, a few times less CPU per request and "
            "per token than httpx) or httpx (the reference; needed for https).",
        ),
    ] = "raw",
) -> None:
    """Load an OpenAI-compatible server and report throughput, TTFT, TPOT, ITL and E2EL."""
    err = Console(stderr=True)
    try:
        extra = _parse_extra(extra_body)
        config = BenchConfig(
            base_url=base_url.rstrip("/"), model=model, endpoint=endpoint,
            num_prompts=num_prompts, input_len=input_len, output_len=output_len,
            max_concurrency=max_concurrency, request_rate=request_rate, burstiness=burstiness,
            seed=seed, tokenizer=tokenizer, vocab_size=vocab_size, warmup=warmup,
            temperature=temperature, ignore_eos=ignore_eos, api_key=api_key,
            timeout_s=timeout, extra_body=extra, client=_client_kind(client),
        )  # fmt: skip
        result = _run_with_progress(config, err)
    except LmaasError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(2) from None
    Console().print(result_table(result))
    if result.summary.errors:
        err.print(
            f"[red]{result.summary.failed} failed; first error:[/] {result.summary.errors[0]}"
        )
    if json_path is not None:
        write_json(result, json_path)
    if result.summary.completed == 0:
        raise typer.Exit(1)


def _client_kind(name: str) -> ClientKind:
    for kind in CLIENTS:
        if name == kind:
            return kind
    raise InvalidRequestError(f"--client {name!r} is not one of {', '.join(CLIENTS)}")


def _parse_extra(text: str | None) -> dict[str, object]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"--extra-body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequestError("--extra-body must be a JSON object")
    return value


def _run_with_progress(config: BenchConfig, console: Console) -> BenchResult:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("requests", total=config.num_prompts, failed=0)
    failed = 0

    def on_outcome(outcome: RequestOutcome) -> None:
        nonlocal failed
        failed += 0 if outcome.success else 1
        progress.update(task, advance=1, failed=failed)

    with progress:
        return asyncio.run(run_benchmark(config, on_outcome))
