"""``lmaas eval``: score a model version on a data set and store the metrics on it.

The evaluation itself runs in a subprocess (:mod:`lmaas.lifecycle.eval_jobs`), so this command, like
the rest of the CLI, never imports torch; it draws the progress bar and the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lmaas.cli.common import load_settings
from lmaas.core.errors import LmaasError
from lmaas.lifecycle.eval_jobs import EvalJobSpec, run_evaluation


def eval_command(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="NAME, NAME:VERSION or NAME@ALIAS.")
    ],
    data: Annotated[Path, typer.Option("--data", help="JSONL examples, or .txt for perplexity.")],
    split: Annotated[
        str | None, typer.Option(help="Use the rows whose 'split' field is this.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N examples.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Generation cap for exact match / BLEU / ROUGE-L.")
    ] = 64,
    no_store: Annotated[
        bool, typer.Option("--no-store", help="Do not record the metrics on the version.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    home: Annotated[
        Path | None, typer.Option(help="lmaas home (default: $LMAAS_HOME or ~/.lmaas).")
    ] = None,
) -> None:
    """Evaluate a model version on a data set; the metrics are stored on the version."""
    stderr = Console(stderr=True)
    settings = load_settings(home)
    spec = EvalJobSpec(
        model=model,
        data=data.expanduser().resolve(),
        home=settings.home,
        database_url=settings.resolved_database_url(),
        split=split,
        limit=limit,
        max_new_tokens=max_new_tokens,
        store=not no_store,
        device=settings.engine.device,
    )
    bar = _Bar(stderr)
    try:
        result = run_evaluation(spec, bar.start, bar.update)
    except LmaasError as exc:
        stderr.print(f"[red]error:[/red] {escape(exc.message)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    finally:
        bar.stop()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_report(Console(), result, stored=not no_store)


class _Bar:
    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task: TaskID | None = None

    def start(self, total: int, description: str) -> None:
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def update(self, done: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=done)

    def stop(self) -> None:
        self._progress.stop()


def _print_report(console: Console, result: dict[str, Any], *, stored: bool) -> None:
    split = f", split {result['split']}" if result["split"] else ""
    console.print(
        f"[bold]{result['model']}[/] ({result['task']}) on {escape(result['dataset'])}{split}: "
        f"{result['num_examples']} examples, sha256 {result['dataset_digest'][:12]}"
    )
    table = Table("METRIC", "VALUE")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    details = result.get("details", {})
    if "per_class" in details:
        per_class = Table("CLASS", "PRECISION", "RECALL", "F1", "SUPPORT", title="per class")
        for row in details["per_class"]:
            per_class.add_row(
                row["label"], f"{row['precision']:.4f}", f"{row['recall']:.4f}",
                f"{row['f1']:.4f}", str(row["support"]),
            )  # fmt: skip
        console.print(per_class)
        labels = details["labels"]
        confusion = Table("true \\ predicted", *labels, title="confusion matrix")
        for label, counts in zip(labels, details["confusion_matrix"], strict=True):
            confusion.add_row(label, *(str(c) for c in counts))
        console.print(confusion)
    for sample in details.get("samples", [])[:3]:
        console.print(
            f"[dim]prediction:[/] {escape(repr(sample['prediction']))}  "
            f"[dim]reference:[/] {escape(repr(sample['reference']))}"
        )
    if stored:
        console.print(f"[dim]stored on {result['model']}; `lmaas models show {result['model']}`[/]")
