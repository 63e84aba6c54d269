"""Evaluate a model version on a data set and store the results on the version.

``lmaas eval`` and ``POST /admin/evaluations`` both run this module as a subprocess
(``python -m lmaas.lifecycle.evaluate``, see :mod:`lmaas.lifecycle.eval_jobs`): it loads torch,
which the gateway and CLI processes never import. It prints JSON-lines events on stdout (``start``,
``progress``, then ``result`` or ``error``) and exits 0 on success.

The model runs in-process through the runners the worker uses (``runtimes.catalog``), so the
predictions are the ones the server would return; see :mod:`lmaas.lifecycle.eval_tasks`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lmaas.core.errors import InternalError, LmaasError
from lmaas.core.types import Task
from lmaas.lifecycle.datasets import EvalData, field_of, load_eval_data
from lmaas.lifecycle.eval_tasks import (
    EvalOptions,
    TaskScores,
    check_examples,
    evaluate_with_runner,
)
from lmaas.registry.lifecycle_db import StoredMetric
from lmaas.registry.manifest import Manifest
from lmaas.registry.service import RegistryService
from lmaas.registry.serving import worker_spec_for


class EvalProgress(Protocol):
    """Receives example counts while an evaluation runs (a progress bar, job state)."""

    def start(self, total: int, description: str) -> None:
        """Called once, before the first example."""

    def advance(self, num_examples: int) -> None:
        """Called as examples finish."""


@dataclass(slots=True)
class EvaluationResult:
    """What one evaluation measured (``metrics`` are stored on the version)."""

    model: str
    task: str
    dataset: str
    dataset_digest: str
    split: str
    num_examples: int
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping."""
        return asdict(self)


def _is_perplexity(task: Task, data: EvalData) -> bool:
    if task not in {Task.CHAT, Task.COMPLETION}:
        return False
    return data.is_text or all("reference" not in r and "text" in r for r in data.rows)


def evaluate(
    registry: RegistryService,
    manifest: Manifest,
    data: EvalData,
    options: EvalOptions,
    progress: EvalProgress,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_root: Path | None = None,
) -> EvaluationResult:
    """Run ``manifest`` over ``data`` and score it (nothing is stored; see :func:`store`).

    Raises:
        InvalidRequestError: Malformed data for the model's task.
        NotSupportedError: No evaluation for the task, or no runner for the model.
        ModelLoadError: The model cannot be loaded.
    """
    perplexity = _is_perplexity(manifest.task, data)
    if not perplexity:
        check_examples(manifest.task, data)  # fail fast, before a large model loads
    registry.verify(manifest)
    cache = (cache_root or Path("/tmp")) / manifest.name / manifest.version
    spec = worker_spec_for(
        manifest, registry.model_dir(manifest), dtype=dtype, device=device, cache_dir=cache
    )
    measured_at = datetime.now(UTC)
    progress.start(len(data.rows), f"evaluating {manifest.ref} on {data.path.name}")
    if perplexity:
        from lmaas.lifecycle.perplexity import causal_lm_perplexity

        texts = [field_of(data, i, "text") for i in range(len(data.rows))]
        scores = TaskScores(causal_lm_perplexity(spec, texts, progress.advance))
    else:
        from lmaas.runtimes.catalog import create_runner

        runner = create_runner(spec)
        info = runner.load()
        scores = evaluate_with_runner(runner, info, manifest.task, data, options, progress.advance)
    return EvaluationResult(
        model=manifest.ref,
        task=manifest.task.value,
        dataset=str(data.path),
        dataset_digest=data.digest,
        split=data.split,
        num_examples=len(data.rows),
        metrics=scores.metrics,
        details=scores.details,
        measured_at=measured_at.isoformat(),
    )


def store(registry: RegistryService, manifest: Manifest, result: EvaluationResult) -> None:
    """Record ``result``'s metrics on the version (keyed by dataset digest and split)."""
    when = datetime.fromisoformat(result.measured_at)
    registry.add_metrics(
        manifest,
        [
            StoredMetric(
                name,
                value,
                result.dataset_digest,
                result.dataset,
                result.split,
                result.num_examples,
                when,
            )
            for name, value in result.metrics.items()
        ],
    )


class _JsonEvents:
    """EvalProgress as JSON lines on stdout (what :mod:`lmaas.lifecycle.eval_jobs` reads)."""

    def __init__(self) -> None:
        self._done = 0

    @staticmethod
    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def start(self, total: int, description: str) -> None:
        self.emit({"event": "start", "total": total, "description": description})

    def advance(self, num_examples: int) -> None:
        self._done += num_examples
        self.emit({"event": "progress", "done": self._done})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmaas.lifecycle.evaluate")
    parser.add_argument("model", help="NAME, NAME:VERSION or NAME@ALIAS")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-store", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluate, store, and print the events; exit 1 with an ``error`` event on failure."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    events = _JsonEvents()
    try:
        with RegistryService(args.home, args.database_url, offline=True) as registry:
            manifest = registry.resolve(args.model)
            data = load_eval_data(args.data, args.split, args.limit)
            batch_size = args.batch_size or manifest.serving.max_batch_size
            options = EvalOptions(batch_size=batch_size, max_new_tokens=args.max_new_tokens)
            result = evaluate(
                registry,
                manifest,
                data,
                options,
                events,
                device=args.device,
                dtype=args.dtype,
                cache_root=args.home / "cache",
            )
            if not args.no_store:
                store(registry, manifest, result)
    except LmaasError as exc:
        events.emit({"event": "error", "code": exc.code, "message": exc.message})
        return 1
    except Exception as exc:  # a bug: report it as one event, the traceback on stderr
        logging.getLogger("lmaas.eval").exception("evaluation failed")
        error = InternalError(f"evaluation failed: {type(exc).__name__}: {exc}")
        events.emit({"event": "error", "code": error.code, "message": error.message})
        return 1
    events.emit({"event": "result", "result": result.to_dict()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
