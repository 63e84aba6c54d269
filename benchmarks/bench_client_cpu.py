"""The load generator's own CPU: ``lmaas bench serve --client raw`` against ``--client httpx``.

On a small machine the client shares the cores with the server it measures, so its CPU per
request and per streamed token is CPU the model does not get. This script runs the same
streamed load through both clients, alternating, against one server, and reports
``time.process_time()`` of this process (the client only: the server is another process)
during the measured requests, per request and per output token.

By default it starts its own ``lmaas serve`` (no auth, loopback) with a model served by the
fake echo runner (one token per step, one SSE event per token, ``--token-delay-s`` per step,
no torch in the worker); ``--base-url`` / ``--model`` / ``--api-key`` measure against a running
server instead (e.g. the random-weight ``demo-chat`` of a fresh ``lmaas serve``, with
``--vocab-size 500``).

    python benchmarks/bench_client_cpu.py [--requests 64] [--output-len 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_servers import free_port, server_process, wait_http

from lmaas.bench import BenchConfig, run_benchmark
from lmaas.bench.serve import CLIENTS
from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_models import build_tiny_causal_lm

ECHO = "lmaas.testing.fake_runners:echo_runner"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server (default: start an echo server)")
    parser.add_argument("--model", default="echo", help="model name [echo]")
    parser.add_argument("--api-key", help="bearer token for --base-url")
    parser.add_argument("--requests", type=int, default=64, help="requests, all concurrent [64]")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens [128]")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens [128]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both clients [3]")
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="prompt ids from 0 to N-1 [32000]"
    )
    parser.add_argument(
        "--token-delay-s", default="0.01", help="echo server: seconds per decode step [0.01]"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


@contextmanager
def echo_server(delay_s: str) -> Iterator[str]:
    """``lmaas serve`` with the echo runner on a fresh home; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="lmaas-client-cpu-") as tmp:
        root = Path(tmp)
        home = root / "home"
        source = build_tiny_causal_lm(root / "src", "llama", seed=0)
        options = {"runner": ECHO, "token_delay_s": delay_s, "context_length": "4096"}
        with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
            registry.import_model(str(source), name="echo", task=None, serving={"options": options})
        port = free_port()
        cmd = [sys.executable, "-m", "lmaas.cli", "serve", "--home", str(home)]
        cmd += ["--port", str(port), "--no-auth", "--model", "echo"]
        base_url = f"http://127.0.0.1:{port}"
        log = root / "serve.log"
        with server_process(cmd, log, {**os.environ, "LMAAS_OFFLINE": "1"}) as proc:
            failed = wait_http(proc, f"{base_url}/v2/health/ready", 120, log)
            if failed:
                raise SystemExit(f"server: {failed}")
            yield base_url


def measure(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {client: [] for client in CLIENTS}
    for round_index in range(args.rounds):
        for client in CLIENTS:
            config = BenchConfig(
                base_url=base_url, model=args.model, num_prompts=args.requests,
                input_len=args.input_len, output_len=args.output_len,
                max_concurrency=args.requests, warmup=2, api_key=args.api_key, client=client,
                vocab_size=args.vocab_size,
            )  # fmt: skip
            result = asyncio.run(run_benchmark(config))
            summary = result.summary
            tokens = summary.total_output_tokens
            run = {
                "completed": summary.completed,
                "output_tokens": tokens,
                "client_cpu_s": result.client_cpu_s,
                "cpu_ms_per_request": 1e3 * result.client_cpu_s / max(summary.completed, 1),
                "cpu_us_per_token": 1e6 * result.client_cpu_s / max(tokens, 1),
                "cpu_share_of_one_core": result.client_cpu_s / summary.duration_s,
                "output_tok_s": summary.output_throughput,
            }
            runs[client].append(run)
            print(
                f"round {round_index + 1} {client:>5}: {run['completed']:.0f} requests, "
                f"{tokens} tokens, client CPU {run['client_cpu_s']:.2f} s = "
                f"{run['cpu_ms_per_request']:.2f} ms/request, "
                f"{run['cpu_us_per_token']:.1f} us/token, "
                f"{100 * run['cpu_share_of_one_core']:.0f}% of a core; "
                f"{run['output_tok_s']:.0f} tok/s"
            )
    medians = {
        client: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for client, rs in runs.items()
    }
    return {"runs": runs, "median": medians}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.base_url:
        results = measure(args, args.base_url)
    else:
        with echo_server(args.token_delay_s) as base_url:
            results = measure(args, base_url)
    raw, ref = results["median"]["raw"], results["median"]["httpx"]
    print(
        f"median client CPU: raw {raw['cpu_ms_per_request']:.2f} ms/request, "
        f"{raw['cpu_us_per_token']:.1f} us/token; httpx {ref['cpu_ms_per_request']:.2f} "
        f"ms/request, {ref['cpu_us_per_token']:.1f} us/token "
        f"({ref['client_cpu_s'] / max(raw['client_cpu_s'], 1e-9):.1f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
