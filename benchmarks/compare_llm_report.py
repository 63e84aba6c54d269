"""The report of ``compare_llm.py``: rates, ratios against the issue's bars, roofline, memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmaas.bench.roofline import MachinePeaks, roofline


def matmul_params(model_dir: Path) -> int:
    """Weights a Llama decode step multiplies with (all but the input embedding)."""
    c = json.loads((model_dir / "config.json").read_text())
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    attn = 2 * hidden * c["num_attention_heads"] * head_dim
    attn += 2 * hidden * c["num_key_value_heads"] * head_dim
    return int(c["num_hidden_layers"] * (attn + 3 * hidden * inter) + hidden * vocab)


def _get(results: dict[str, Any], *path: str) -> float | None:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def summarize(results: dict[str, Any], args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Rates, ratios, roofline fractions and the memory check, from the raw phase results."""
    rates = {
        "lmaas_batch": _get(results, "lmaas", "batch", "output_throughput"),
        "lmaas_single_decode": _get(results, "lmaas", "single", "decode_tok_s"),
        "hf_static_batch": _get(results, "hf_static", "batch_output_throughput"),
        "hf_static_single_decode": _get(results, "hf_static", "single_decode_tok_s"),
        "hf_generate_batch": _get(results, "hf_generate_batch", "output_throughput"),
        "tf_serve_batch": _get(results, "transformers_serve", "batch", "output_throughput"),
        "tf_serve_single_decode": _get(results, "transformers_serve", "single", "decode_tok_s"),
    }

    def ratio(a: str, b: str) -> float | None:
        x, y = rates[a], rates[b]
        return x / y if x and y else None

    ratios = {
        "lmaas/hf_static (batch, bar >= 3)": ratio("lmaas_batch", "hf_static_batch"),
        "lmaas/generate_batch (bar >= 6)": ratio("lmaas_batch", "hf_generate_batch"),
        "lmaas/hf batch-1 (decode, bar >= 1)": ratio(
            "lmaas_single_decode", "hf_static_single_decode"
        ),
        "lmaas/transformers serve (batch)": ratio("lmaas_batch", "tf_serve_batch"),
    }
    return {
        "rates_tok_s": rates,
        "ratios": ratios,
        "roofline": _roofline(results, rates, args, model_dir),
        "memory": _memory(results),
    }


def _roofline(
    results: dict[str, Any],
    rates: dict[str, float | None],
    args: argparse.Namespace,
    model_dir: Path,
) -> dict[str, Any]:
    peaks_raw = results.get("roofline", {})
    if "matmul_flops" not in peaks_raw:
        return {"error": peaks_raw.get("error", "not measured")}
    peaks = MachinePeaks(
        args.device,
        "bfloat16",
        peaks_raw["matmul_flops"],
        peaks_raw["bandwidth_bytes_s"],
        peaks_raw["details"],
    )
    params = matmul_params(model_dir)
    out: dict[str, Any] = {"matmul_params": params, "peaks": peaks_raw}
    batches = {
        "lmaas_batch": args.requests,
        "lmaas_single_decode": 1,
        "hf_static_batch": args.requests,
        "hf_static_single_decode": 1,
    }
    for key, batch in batches.items():
        rate = rates[key]
        if rate:
            fr = roofline(params, 2, batch, rate, peaks)
            out[key] = {
                "compute_fraction": fr.compute_fraction,
                "bandwidth_fraction": fr.bandwidth_fraction,
                "text": fr.describe(),
            }
    return out


def _memory(results: dict[str, Any]) -> dict[str, Any]:
    lmaas = results.get("lmaas", {})
    memory, budget = lmaas.get("memory"), lmaas.get("memory_budget")
    if not memory or not budget or "VmHWM" not in memory:
        return {"error": "worker not found or not measured"}
    peak = memory["VmHWM"]
    return {
        **budget,
        "peak_rss_bytes": peak,
        "margin_bytes": budget["allowance_bytes"] - peak,
        "excess_over_weights_kv_bytes": peak - budget["weights_bytes"] - budget["kv_budget_bytes"],
        "within_allowance": peak <= budget["allowance_bytes"],
    }


def print_report(
    summary: dict[str, Any], results: dict[str, Any], args: argparse.Namespace
) -> None:
    console = Console()
    title = (
        f"{args.requests} concurrent requests, {args.input_len} prompt / {args.output_len} output"
    )
    table = Table(title=f"Output tokens/s ({title}; single = decode tok/s)")
    table.add_column("system / scenario")
    table.add_column("tok/s (median)", justify="right")
    table.add_column("range over rounds", justify="right")
    rate_rounds = summary.get("rates_tok_s_rounds", {})
    ratio_rounds = summary.get("ratios_rounds", {})
    for key, rate in summary["rates_tok_s"].items():
        seen = rate_rounds.get(key, [])
        spread = f"{min(seen):,.1f} to {max(seen):,.1f}" if len(seen) > 1 else ""
        table.add_row(key, f"{rate:,.1f}" if rate else "-", spread)
    for key, value in summary["ratios"].items():
        seen = ratio_rounds.get(key, [])
        spread = f"{min(seen):.2f} to {max(seen):.2f}x" if len(seen) > 1 else ""
        table.add_row(f"[bold]{key}[/]", f"{value:.2f}x" if value else "-", spread)
    console.print(table)
    for key, value in summary["roofline"].items():
        if isinstance(value, dict) and "text" in value:
            console.print(f"roofline {key}: {value['text']}")
    console.print(f"peaks: {summary['roofline'].get('peaks', {}).get('details')}")
    mem = summary["memory"]
    if "peak_rss_bytes" in mem:
        mb = 1e6
        console.print(
            f"lmaas worker peak RSS {mem['peak_rss_bytes'] / mb:,.0f} MB; weights "
            f"{mem['weights_bytes'] / mb:,.0f} MB + KV ({mem['kv_budget_source']}) "
            f"{mem['kv_budget_bytes'] / mb:,.0f} MB; excess "
            f"{mem['excess_over_weights_kv_bytes'] / mb:,.0f} MB "
            f"vs the 600 MB allowance: {'within' if mem['within_allowance'] else 'OVER'}"
        )
    for name, value in results.items():
        error = value.get("error") if isinstance(value, dict) else None
        if error:
            console.print(f"[yellow]{name}: {error}[/]")
