"""Deployment bars of issue 6: a 10% canary's share of 2,000 requests, and rollbacks under load.

Starts a real ``lmaas serve`` (no auth, loopback) on a fresh home with two versions of a model
served by the fake echo runner (real worker processes, no torch in them), then:

1. ``lmaas deploy echo --canary 2 --percent 10``; 2,000 completions from ``--concurrency``
   clients; the share served by version 2 (``x-lmaas-model-version``) must be 10 ± 2%.
2. Rollback of a canary under load: ``--canary 2 --percent 50``, load, ``--rollback``.
3. Rollback of a promotion under load: promote 2, load, ``--rollback`` (version 1 is started
   again, then version 2's replicas drain).

During each rollback ``--concurrency`` clients send streamed and plain completions without
pause; every request must succeed (HTTP 200, and a stream must end with ``[DONE]``).

    python benchmarks/deploy_canary.py [--replicas 2] [--concurrency 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from bench_servers import free_port, server_process, wait_http

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_models import build_tiny_causal_lm

ECHO = "lmaas.testing.fake_runners:echo_runner"
HEADER = "x-lmaas-model-version"


def _deploy(home: Path, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "lmaas.cli", "deploy", "echo", *args, "--json"]
    done = subprocess.run(
        [*command, "--home", str(home)], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def _wait_applied(client: httpx.AsyncClient, revision: int) -> float:
    start = time.perf_counter()
    while True:
        live = (await client.get("/admin/deployments/echo")).json()["live"]
        settled = live["revision"] >= revision and live["draining_replicas"] == 0
        if settled and all(v["state"] == "ready" for v in live["versions"]):
            return time.perf_counter() - start
        await asyncio.sleep(0.05)


async def _one(client: httpx.AsyncClient, i: int, stream: bool) -> tuple[bool, str]:
    body = {"model": "echo", "prompt": "a b c", "max_tokens": 8 if stream else 1}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        return response.status_code == 200, response.headers.get(HEADER, "?")
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = [line async for line in r.aiter_lines() if line]
    ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
    return ok and not any('"error"' in line for line in lines), r.headers.get(HEADER, "?")


async def canary_share(base: str, home: Path, requests: int, concurrency: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await _wait_applied(client, _deploy(home, "--version", "1")["revision"])
        await _wait_applied(client, _deploy(home, "--canary", "2", "--percent", "10")["revision"])
        versions: Counter[str] = Counter()
        failures = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                ok, version = await _one(client, queue.get_nowait(), stream=False)
                versions[version] += 1
                failures += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    share = versions["2"] / requests
    return {
        "requests": requests,
        "versions": dict(versions),
        "canary_share": share,
        "within_10_pm_2": 0.08 <= share <= 0.12,
        "failures": failures,
        "seconds": round(elapsed, 2),
    }


async def rollback_under_load(
    base: str, home: Path, setup: list[list[str]], concurrency: int
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for args in setup:
            await _wait_applied(client, _deploy(home, *args)["revision"])
        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()
        failures: list[str] = []

        async def worker(k: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    ok, version = await _one(client, i, stream=k % 2 == 0)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if ok:
                    outcomes[version] += 1
                else:
                    failures.append(version)

        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(2.0)
        start = time.perf_counter()
        revision = (await asyncio.to_thread(_deploy, home, "--rollback"))["revision"]
        written = time.perf_counter() - start
        applied = await _wait_applied(client, revision) + written
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "setup": [" ".join(a) for a in setup],
        "requests": sum(outcomes.values()) + len(failures),
        "failures": len(failures),
        "failure_samples": failures[:5],
        "versions": dict(outcomes),
        "cli_seconds": round(written, 2),
        "rollback_applied_and_drained_seconds": round(applied, 2),
    }


def _build_home(root: Path) -> Path:
    home = root / "home"
    source = build_tiny_causal_lm(root / "src", "llama", seed=0)
    with RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True) as registry:
        for _ in range(2):
            registry.import_model(
                str(source),
                name="echo",
                task=None,
                serving={"options": {"runner": ECHO, "token_delay_s": "0.002"}},
            )
    return home


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    home = _build_home(root)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = root / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "lmaas.cli",
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--no-auth",
        "--model",
        "echo:1",
    ]
    env = {**os.environ, "LMAAS_OFFLINE": "1", "LMAAS_DEPLOY__AUTO_ROLLBACK": "false"}
    with server_process(cmd, log, env) as proc:
        failed = await asyncio.to_thread(wait_http, proc, f"{base}/v2/health/ready", 120, log)
        if failed:
            raise SystemExit(f"server: {failed}")
        r = str(args.replicas)
        share = await canary_share(base, home, args.requests, args.concurrency)
        canary = await rollback_under_load(
            base,
            home,
            [
                ["--version", "1", "--replicas", r],
                ["--canary", "2", "--percent", "50", "--replicas", r],
            ],
            args.concurrency,
        )
        promotion = await rollback_under_load(
            base,
            home,
            [
                ["--version", "1", "--replicas", r],
                ["--canary", "2", "--percent", "10"],
                ["--promote"],
            ],
            args.concurrency,
        )
    return {
        "canary_10_percent": share,
        "rollback_canary_under_load": canary,
        "rollback_promotion_under_load": promotion,
        "replicas": args.replicas,
        "concurrency": args.concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmaas-deploy-bench-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
