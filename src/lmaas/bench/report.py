"""Presenting a :class:`~lmaas.bench.serve.BenchResult`: a rich table and vLLM-keyed JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from lmaas.bench.metrics import METRICS, percentile_key
from lmaas.bench.serve import BenchResult

_LABELS = {
    "ttft": "Time to first token",
    "tpot": "Time per output token (excl. 1st)",
    "itl": "Inter-token latency (chunk gaps)",
    "e2el": "End-to-end latency",
}


def result_dict(result: BenchResult) -> dict[str, object]:
    """The result as JSON-ready values, keyed as ``vllm bench serve --save-result`` keys them.

    Rates that are infinite are written as the string ``"inf"`` (JSON has no infinity).
    """
    config, summary = result.config, result.summary
    data: dict[str, object] = {
        "date": result.started_at.isoformat(),
        "backend": "openai",
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "model_id": config.model,
        "num_prompts": config.num_prompts,
        "input_len": config.input_len,
        "output_len": config.output_len,
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "seed": config.seed,
        "duration": summary.duration_s,
        "completed": summary.completed,
        "failed": summary.failed,
        "total_input_tokens": summary.total_input_tokens,
        "total_output_tokens": summary.total_output_tokens,
        "request_throughput": summary.request_throughput,
        "output_throughput": summary.output_throughput,
        "total_token_throughput": summary.total_token_throughput,
        "max_concurrent_requests": summary.max_concurrent_requests,
    }
    for name in METRICS:
        stats = summary.latency[name]
        data[f"mean_{name}_ms"] = stats.mean_ms
        data[f"median_{name}_ms"] = stats.median_ms
        data[f"std_{name}_ms"] = stats.std_ms
        for p, value in stats.percentiles_ms.items():
            data[f"{percentile_key(p)}_{name}_ms"] = value
    data["errors"] = summary.errors[:20]
    return data


def write_json(result: BenchResult, path: Path) -> None:
    """Write :func:`result_dict` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_dict(result), indent=2) + "\n", encoding="utf-8")


def result_table(result: BenchResult) -> Table:
    """A two-column table in the order vLLM prints its summary."""
    config, summary = result.config, result.summary
    table = Table(title=f"Serving benchmark: {config.model} at {config.base_url}{config.endpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    rows = [
        ("Successful requests", f"{summary.completed}"),
        ("Failed requests", f"{summary.failed}"),
        ("Max concurrency / request rate", f"{config.max_concurrency or '-'} / {rate}"),
        ("Benchmark duration (s)", f"{summary.duration_s:.2f}"),
        ("Total input tokens", f"{summary.total_input_tokens}"),
        ("Total generated tokens", f"{summary.total_output_tokens}"),
        ("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{summary.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
        ("Peak concurrent requests", f"{summary.max_concurrent_requests}"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    for name in METRICS:
        stats = summary.latency[name]
        table.add_section()
        table.add_row(f"[bold]{_LABELS[name]}[/]", "")
        table.add_row(f"Mean {name.upper()} (ms)", f"{stats.mean_ms:.2f}")
        table.add_row(f"Median {name.upper()} (ms)", f"{stats.median_ms:.2f}")
        for p, ms in stats.percentiles_ms.items():
            table.add_row(f"{percentile_key(p).upper()} {name.upper()} (ms)", f"{ms:.2f}")
    return table
