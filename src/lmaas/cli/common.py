"""What every CLI command shares: its settings and its one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from lmaas.bootstrap.settings import Settings


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one red ``error:`` line on stderr and exit with ``code``."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


def load_settings(home: Path | None = None) -> Settings:
    """The settings from ``LMAAS_*`` (and ``--home`` when given). A bad variable is named, one
    line each, with exit code 2 and no traceback."""
    try:
        return Settings(home=home) if home is not None else Settings()
    except ValidationError as exc:
        err = Console(stderr=True)
        for error in exc.errors():
            name = "LMAAS_" + "__".join(str(part) for part in error["loc"]).upper()
            err.print(f"[red]error:[/] bad setting {name}: {escape(error['msg'])}", soft_wrap=True)
        raise typer.Exit(2) from None
