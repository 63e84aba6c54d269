"""Compare lmaas with HF transformers on one machine and one model, in one run (issue 3).

Measures, on the ~125M Llama-shaped random-weight bf16 model (``build_bench_llama``):

* lmaas over HTTP (``lmaas serve`` in a subprocess, driven by ``lmaas.bench.run_benchmark``);
* HF ``generate`` with static batching, in-process (batch N and batch 1);
* HF ``generate_batch`` (transformers' continuous batching) on the same N requests;
* ``transformers serve --continuous-batching`` over HTTP, when it starts;

for two scenarios: N concurrent requests of I prompt / O output tokens (``ignore_eos``), and single
requests (decode tok/s = 1 / TPOT). Also measures this machine's bf16 matmul FLOP/s and memory
bandwidth and reports the roofline fractions, and the lmaas worker's peak RSS (VmHWM).
Every phase runs under a deadline; every subprocess is stopped on the way out. Run::

    .venv/bin/python benchmarks/compare_llm.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_servers import admin_key, free_port, server_process, wait_http
from compare_llm_phases import RESULT_PREFIX, print_result, run_phase
from compare_llm_report import print_report, summarize
from rich.console import Console

from lmaas.bench import BenchConfig, result_dict, run_benchmark
from lmaas.registry.service import RegistryService

MODEL_NAME = "bench-llama"
ALLOWANCE_BYTES = 600 * 10**6
"""The issue's memory bar: worker peak RSS within weights + KV budget + 600 MB."""
_console = Console(stderr=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 requests of 32/32 tokens")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--requests", type=int, help="concurrent requests [64; quick 16]")
    parser.add_argument("--input-len", type=int, help="prompt tokens [128; quick 32]")
    parser.add_argument("--output-len", type=int, help="output tokens [128; quick 32]")
    parser.add_argument("--single-requests", type=int, help="batch-1 repeats [3; quick 1]")
    parser.add_argument("--kv-cache-bytes", type=int, help="lmaas serving.kv_cache_bytes")
    parser.add_argument(
        "--lmaas-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a serving option of the lmaas model, e.g. engine=paged (repeatable)",
    )
    parser.add_argument("--phase-timeout", type=float, default=900.0, help="seconds per phase")
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="the load generator's HTTP client (lmaas bench serve --client) [raw: least CPU]",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="skip a system: lmaas, hf-static, hf-generate-batch, tf-serve",
    )
    parser.add_argument("--workdir", type=Path, help="keep the model and logs here")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every system, interleaved; the report gives the median and the range",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.requests = args.requests or (16 if quick else 64)
    args.input_len = args.input_len or (32 if quick else 128)
    args.output_len = args.output_len or (32 if quick else 128)
    args.single_requests = args.single_requests or (1 if quick else 3)
    return args


def phase(name: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Run a torch phase in a child process under the phase deadline."""
    payload = json.dumps({**_common(args), **extra})
    cmd = [sys.executable, __file__, "--phase", name, "--phase-args", payload]
    _console.print(f"[bold]phase {name}[/]")
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.phase_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.phase_timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["wall_s"] = time.perf_counter() - start
    return result


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "batch_requests": args.requests,
        "single_requests": args.single_requests,
        "vocab_size": 32000,
        "seed": 0,
    }


def bench(
    args: argparse.Namespace, base_url: str, model: str, **kw: Any
) -> dict[str, dict[str, Any]]:
    """The batch and single scenarios against one server, each under the phase deadline."""
    common = {
        "base_url": base_url,
        "model": model,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": 0,
        "timeout_s": args.phase_timeout,
        "client": args.client,
        **kw,
    }
    scenarios = {
        "batch": BenchConfig(
            num_prompts=args.requests, max_concurrency=args.requests, warmup=2, **common
        ),
        "single": BenchConfig(
            num_prompts=args.single_requests, max_concurrency=1, warmup=1, **common
        ),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, config in scenarios.items():
        _console.print(f"  scenario {name}: {config.num_prompts} requests")
        try:
            result = asyncio.run(asyncio.wait_for(run_benchmark(config), args.phase_timeout))
        except TimeoutError:
            out[name] = {"error": f"timed out after {args.phase_timeout:.0f} s"}
            continue
        out[name] = result_dict(result)
        out[name]["client"] = config.client
        tpot_ms = result.summary.latency["tpot"].mean_ms
        out[name]["decode_tok_s"] = 1000.0 / tpot_ms if tpot_ms > 0 else 0.0
    return out


def worker_memory(server_pid: int) -> dict[str, int] | None:
    """VmHWM / VmRSS (bytes) of the server's ``lmaas.worker`` child, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and "lmaas.worker" in cmdline:
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            found = {"pid": int(entry.name)}
            for key in ("VmHWM", "VmRSS"):
                if key in fields:
                    found[key] = int(fields[key].split()[0]) * 1024
            return found
    return None


def kv_bytes_needed(model_dir: Path, num_seqs: int, tokens: int) -> int:
    """KV-cache bytes for ``num_seqs`` sequences of ``tokens`` tokens in bf16."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    return int(per_token * num_seqs * tokens)


def kv_bytes_allocated(log: Path) -> int | None:
    """The KV memory the worker allocated (blocks and decode view), from its log line
    "KV cache: N blocks of B tokens (X MiB, Y MiB with the decode view)"."""
    match = re.search(
        r"KV cache: \d+ blocks of \d+ tokens \([0-9.]+ MiB, ([0-9.]+) MiB with the decode view\)",
        log.read_text(),
    )
    return int(float(match.group(1)) * 2**20) if match else None


def run_lmaas(args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    home = work / "lmaas-home"
    serving: dict[str, Any] = {"max_batch_size": args.requests, "dtype": "bfloat16"}
    if args.device != "cpu":
        serving["device"] = args.device
    if args.kv_cache_bytes:
        serving["kv_cache_bytes"] = args.kv_cache_bytes
    options = dict(item.split("=", 1) for item in args.lmaas_option)
    if options:
        serving["options"] = options
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    try:
        registry.import_model(str(model_dir), name=MODEL_NAME, serving=serving)
    finally:
        registry.close()
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lmaas.cli",
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--model",
        MODEL_NAME,
    ]
    env = {**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    base_url = f"http://127.0.0.1:{port}"
    log = work / "lmaas-serve.log"
    _console.print("[bold]lmaas serve[/]")
    with server_process(cmd, log, env) as proc:
        why = wait_http(proc, f"{base_url}/v2/health/ready", 300, log, "failed to load")
        if why is not None:
            return {"error": f"lmaas serve did not start: {why}"}
        # Measured as deployed: with authentication on, through the key of the fresh install.
        key = admin_key(log, home / "admin-key")
        if key is None:
            return {"error": f"lmaas serve printed no admin key (log: {log})"}
        result: dict[str, Any] = bench(args, base_url, MODEL_NAME, vocab_size=32000, api_key=key)
        result["memory"] = worker_memory(proc.pid)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    allocated = kv_bytes_allocated(log)
    kv = (
        allocated
        or args.kv_cache_bytes
        or kv_bytes_needed(model_dir, args.requests, args.input_len + args.output_len)
    )
    source = "worker log (allocated)" if allocated else "scenario need"
    result["memory_budget"] = {
        "weights_bytes": weights,
        "kv_budget_bytes": kv,
        "kv_budget_source": source,
        "allowance_bytes": weights + kv + ALLOWANCE_BYTES,
    }
    return result


def run_tf_serve(args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [
        str(exe),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--device",
        args.device,
        "--continuous-batching",
        "--attn-implementation",
        "sdpa",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = work / "transformers-serve.log"
    _console.print("[bold]transformers serve[/]")
    with server_process(cmd, log, env) as proc:
        why = wait_http(proc, f"http://127.0.0.1:{port}/health", 180, log)
        if why is not None:
            return {"error": f"transformers serve did not start: {why}", "command": cmd}
        # It refuses unknown fields (ignore_eos) and takes text prompts only; a generation
        # config without EOS ids has the same effect as ignore_eos.
        gen = json.dumps({"max_new_tokens": args.output_len, "do_sample": False})
        result = bench(
            args,
            f"http://127.0.0.1:{port}",
            str(model_dir),
            tokenizer=model_dir,
            ignore_eos=False,
            extra_body={"generation_config": gen},
        )
    return {**result, "command": cmd}


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last round's summary with every rate and ratio replaced by its median over the
    rounds, and the per-round values kept beside it (``*_rounds``)."""
    summary = dict(rounds[-1])
    for section in ("rates_tok_s", "ratios"):
        values: dict[str, list[float]] = {}
        for one in rounds:
            for name, value in one[section].items():
                if value is not None:
                    values.setdefault(name, []).append(value)
        summary[section] = {
            name: statistics.median(values[name]) if name in values else None
            for name in rounds[-1][section]
        }
        summary[f"{section}_rounds"] = values
    return summary


def orchestrate(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        work: Path = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="cmp-llm-"))
        )
        work.mkdir(parents=True, exist_ok=True)
        built = phase("build", args, dest=str(work / MODEL_NAME))
        if "error" in built:
            _console.print(f"[red]model build failed:[/] {built['error']}")
            return 1
        model_dir = Path(built["model_dir"])
        results: dict[str, Any] = {"config": {**_common(args), "quick": args.quick}}
        results["roofline"] = phase("roofline", args)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "lmaas": lambda: run_lmaas(args, model_dir, work),
            "hf_static": lambda: phase("hf-static", args, model_dir=str(model_dir)),
            "hf_generate_batch": lambda: phase("hf-generate-batch", args, model_dir=str(model_dir)),
            "transformers_serve": lambda: run_tf_serve(args, model_dir, work),
        }
        names = {
            "lmaas": "lmaas",
            "hf_static": "hf-static",
            "hf_generate_batch": "hf-generate-batch",
            "transformers_serve": "tf-serve",
        }
        rounds = []
        for round_index in range(max(1, args.repeat)):
            for key, step in steps.items():
                # transformers serve is measured once: it is the slowest and rarely starts.
                once = key == "transformers_serve" and round_index > 0
                if names[key] in args.skip or once:
                    results[key] = results.get(key, {"error": "skipped"})
                    continue
                results[key] = step()
            rounds.append(summarize(results, args, model_dir))
        results["rounds"] = rounds
        results["summary"] = combine_rounds(rounds)
        print_report(results["summary"], results, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print_result(run_phase(args.phase, json.loads(args.phase_args)))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
