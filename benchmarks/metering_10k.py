"""The metering bar of issue 5: 10,000 metered requests at concurrency 64, 0 usage records lost,
0 over-admissions.

One real ``lmaas serve`` (auth on, metering on, the in-process limiter or ``--limits-backend
redis``) serves a no-op model (``hash_embedding_runner``: the worker embeds by hashing, so the
gateway is what is exercised). A key limited by a **quota of 9,000 requests per day** and **48
concurrent requests** gets 10,000 ``/v1/embeddings`` requests from 64 concurrent clients over
loopback. Then:

* **Records lost**: the ``X-Request-Id`` of every 2xx the client counted must be a usage row of
  the key, and every usage row of the key must be one of them (checked while the server runs,
  after a flush interval, and again after SIGTERM).
* **Over-admissions (quota)**: exact: the 200s must equal ``min(9000, sent - concurrency
  refusals)``: a request refused for concurrency takes nothing from the quota, so the quota is
  reached only if enough requests got past concurrency; every other request is a 429
  ``quota_exceeded`` with ``Retry-After``.
* **Over-admissions (concurrency)**: the usage rows say when each admitted request arrived and
  ended; their largest overlap bounds the requests admitted at once from above (the admission
  hold lies inside that span), so an overlap <= 48 proves the limit held (a larger overlap would
  be inconclusive, not a failure).

    python benchmarks/metering_10k.py                    # ~1 min on 2 cores
    python benchmarks/metering_10k.py --requests 2000    # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import admin_key, free_port, server_process, wait_http
from governance_overhead import BODY, MODEL, _lmaas, _prepare_home

QUOTA = 9000
MAX_CONCURRENT = 48


async def _send(base: str, key: str, total: int, concurrency: int) -> dict[str, Any]:
    """``total`` requests from ``concurrency`` clients; the statuses, the 200s' request ids."""
    statuses: dict[str, int] = {}
    ok_ids: list[str] = []
    missing_retry_after = 0
    remaining = total
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal remaining, missing_retry_after
        while remaining > 0:
            remaining -= 1
            response = await client.post(f"{base}/v1/embeddings", json=BODY, headers=headers)
            kind = str(response.status_code)
            if response.status_code == 200:
                ok_ids.append(response.headers["x-request-id"])
            elif response.status_code == 429:
                kind = f"429 {response.json()['error']['code']}"
                if "retry-after" not in response.headers:
                    missing_retry_after += 1
            statuses[kind] = statuses.get(kind, 0) + 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "requests": total,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(total / elapsed, 1),
        "statuses": dict(sorted(statuses.items())),
        "ok_ids": ok_ids,
        "429_without_retry_after": missing_retry_after,
    }


def _usage_rows(home: Path, key_id: str) -> list[tuple[str, datetime, float, int]]:
    """(request id, end, latency ms, status) of every usage row of the key."""
    from lmaas.gateway.usage_store import SqlUsageStore, UsageQuery

    store = SqlUsageStore(f"sqlite:///{home / 'lmaas.db'}")
    try:
        rows = store.list_records(UsageQuery(key_id=key_id), limit=10**7)
        return [(r.request_id, r.at, r.latency_ms, r.status) for r in rows]
    finally:
        store.close()


def _max_overlap(rows: list[tuple[str, datetime, float, int]]) -> int:
    """The most usage spans (arrival to end) that overlap at one instant."""
    events: list[tuple[datetime, int]] = []
    for _, end, latency_ms, _ in rows:
        events += [(end - timedelta(milliseconds=latency_ms), 1), (end, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def _compare(ok_ids: list[str], rows: list[tuple[str, datetime, float, int]]) -> dict[str, Any]:
    served = set(ok_ids)
    recorded = [r[0] for r in rows]
    return {
        "usage_rows": len(rows),
        "lost": len(served - set(recorded)),
        "unexpected": len(set(recorded) - served),
        "duplicates": len(recorded) - len(set(recorded)),
        "non_200_rows": sum(1 for r in rows if r[3] != 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--limits-backend", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    quota = min(QUOTA, args.requests * 9 // 10)

    report: dict[str, Any] = {"limits_backend": args.limits_backend, "quota": quota}
    with tempfile.TemporaryDirectory(prefix="lmaas-meter10k-") as tmp, ExitStack() as stack:
        home = Path(tmp) / "home"
        home.mkdir()
        _prepare_home(home)
        env = {**os.environ, "LMAAS_OFFLINE": "1", "LMAAS_LIMITS__BACKEND": args.limits_backend}
        env["LMAAS_REDIS_URL"] = args.redis_url
        env["LMAAS_LIMITS__KEY_PREFIX"] = f"lmaas-bench:{os.getpid()}:{time.time_ns()}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "serve.log"
        cmd = [sys.executable, "-m", "lmaas.cli", "serve", "--home", str(home)]
        cmd += ["--model", MODEL, "--port", str(port)]
        server = stack.enter_context(server_process(cmd, log, env))
        why = wait_http(server, f"{base}/v2/health/ready", 120, log)
        if why or admin_key(log, Path(tmp) / "admin-key") is None:
            raise SystemExit(f"the server did not start: {why}")
        _lmaas(home, "tenants", "create", "bench")
        key = _lmaas(
            home, "keys", "create", "--tenant", "bench", "--scope", "inference",
            "--quota-requests", f"{quota}/day", "--max-concurrent", str(MAX_CONCURRENT),
        )  # fmt: skip
        key_id = key.split("-")[1]
        day = datetime.now(UTC).date()
        print(
            f"{args.requests} requests at concurrency {args.concurrency}; key quota "
            f"{quota} requests/day, {MAX_CONCURRENT} concurrent ({args.limits_backend}) ..."
        )
        sent = asyncio.run(_send(base, key, args.requests, args.concurrency))
        ok_ids = sent.pop("ok_ids")
        report["load"] = sent
        time.sleep(1.5)  # three flush intervals: the rows of a running server
        report["while_running"] = _compare(ok_ids, _usage_rows(home, key_id))
        server.terminate()  # SIGTERM: drain, write what is left
        server.wait(60)
        rows = _usage_rows(home, key_id)
        report["after_sigterm"] = _compare(ok_ids, rows)
        report["max_overlap_of_served_spans"] = _max_overlap(rows)
    if datetime.now(UTC).date() != day:
        print("WARNING: the run crossed 00:00 UTC: a new quota day began; rerun")

    statuses = report["load"]["statuses"]
    admitted = statuses.get("200", 0)
    concurrency_refused = statuses.get("429 rate_limit_exceeded", 0)
    expected = min(quota, args.requests - concurrency_refused)
    report["quota_check"] = {
        "admitted": admitted,
        "expected_exactly": expected,
        "over_admissions": max(0, admitted - expected),
        "under_admissions": max(0, expected - admitted),
    }
    overlap = report["max_overlap_of_served_spans"]
    report["concurrency_check"] = {
        "limit": MAX_CONCURRENT,
        "upper_bound_of_admitted_at_once": overlap,
        "proven_within_limit": overlap <= MAX_CONCURRENT,
    }
    load = report["load"]
    print(f"load: {load['seconds']} s, {load['requests_per_s']} req/s, statuses {statuses}")
    for phase in ("while_running", "after_sigterm"):
        c = report[phase]
        print(
            f"usage rows {phase.replace('_', ' ')}: {c['usage_rows']} for {admitted} 200s: "
            f"lost {c['lost']}, unexpected {c['unexpected']}, duplicates {c['duplicates']}"
        )
    q = report["quota_check"]
    print(
        f"quota: {q['admitted']} admitted, expected exactly {q['expected_exactly']}: "
        f"over-admissions {q['over_admissions']}, under-admissions {q['under_admissions']}; "
        f"429 without Retry-After {load['429_without_retry_after']}"
    )
    print(
        f"concurrency: at most {overlap} admitted requests overlapped (limit {MAX_CONCURRENT}): "
        + ("over-admissions 0" if overlap <= MAX_CONCURRENT else "inconclusive")
    )
    after = report["after_sigterm"]
    bar = after["lost"] == 0 and after["unexpected"] == 0 and q["over_admissions"] == 0
    print(f"bar (0 usage records lost, 0 over-admissions): {'met' if bar else 'NOT met'}")
    report["meets_bar"] = bar
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
