"""What authentication + rate limits + metering cost per request, and whether limits hold.

Two phases, on a no-op model (``lmaas.testing.fake_runners:hash_embedding_runner``: a worker
that embeds by hashing, so the model costs ~nothing and the gateway is what is measured):

0. **In process**: the app alone (ASGI transport, fake engine), governed vs open: what the
   gateway's governance code costs, without the noise of sockets and workers.
1. **Overhead**: one ``lmaas serve`` per variant on the same home (``VARIANTS``: ``open`` is
   governance disabled, ``governed`` is auth + limits + quotas + metering, ``auth`` and
   ``limits`` the steps between, ``open-twin`` the A/A control); the cheap open-loop client of
   :mod:`lmaas.bench.openloop` sends ``/v1/embeddings`` at a fixed rate (200 requests/s) to
   each in interleaved rounds (``overhead_rounds.py``) and reports p50/p90/p99, the achieved
   rate, the CPU per request of each process, and the governed-minus-open differences paired
   by round (bar: <= 0.3 ms at p50).
2. **Admission**: N requests (10,000; ``--quick``: 1,200) at concurrency 64 to the governed
   server with a key limited to ``rpm`` requests per minute; the 200s are counted against what
   the limit allows over the run (the bucket plus its refill): over-admissions must be 0, and
   every 429 must carry ``Retry-After``.

Metering is built on another branch: when the DB has a ``usage`` table the script reports its
row count for the admission key (it must equal the 200s), else it says "metering not present".

``--limits-backend redis`` runs the governed server with the Redis limiter (``--redis-url``).

    python benchmarks/governance_overhead.py --quick --skip-admission      # ~1 min
    python benchmarks/governance_overhead.py --skip-admission --realtime --rounds 6
    python benchmarks/governance_overhead.py --json out.json               # everything
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_servers import admin_key, free_port, server_process, wait_http
from overhead_rounds import Target, descendants, interleaved, set_realtime, summarize

from lmaas.bench.openloop import encode_request

RUNNER = "lmaas.testing.fake_runners:hash_embedding_runner"
MODEL = "noop-embed"
BODY = {"model": MODEL, "input": "the quick brown fox jumps over the lazy dog"}


def _lmaas(home: Path, *args: str, database_url: str | None = None) -> str:
    env = {**os.environ, "LMAAS_OFFLINE": "1"}
    if database_url is not None:
        env["LMAAS_DATABASE_URL"] = database_url
    command = [sys.executable, "-m", "lmaas.cli", *args, "--home", str(home)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lmaas {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _prepare_home(home: Path, database_url: str | None = None) -> None:
    from lmaas.registry.service import RegistryService
    from lmaas.testing.tiny_models import build_tiny_embedder

    source = build_tiny_embedder(home.parent / "tiny-embed", seed=0)
    url = database_url or f"sqlite:///{home / 'lmaas.db'}"
    registry = RegistryService(home, url, offline=True)
    try:
        registry.import_model(str(source), name=MODEL, serving={"options": {"runner": RUNNER}})
    finally:
        registry.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": pct(0.50) * 1e3,
        "p90_ms": pct(0.90) * 1e3,
        "p99_ms": pct(0.99) * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


async def _admission(base: str, key: str, total: int, concurrency: int, rpm: int) -> dict[str, Any]:
    statuses: dict[int, int] = {}
    missing_retry_after = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal missing_retry_after
        while not queue.empty():
            queue.get_nowait()
            response = await client.post(f"{base}/v1/embeddings", json=BODY, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 429 and "retry-after" not in response.headers:
                missing_retry_after += 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    admitted = statuses.get(200, 0)
    allowed = rpm + int(elapsed * rpm / 60)  # the full bucket, plus its refill during the run
    return {
        "requests": total,
        "concurrency": concurrency,
        "rpm_limit": rpm,
        "seconds": elapsed,
        "requests_per_s": total / elapsed,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "admitted": admitted,
        "allowed_at_most": allowed,
        "over_admissions": max(0, admitted - allowed),
        "429_without_retry_after": missing_retry_after,
    }


async def _in_process(num_requests: int) -> dict[str, Any]:
    """The gateway alone: the app over an in-memory ASGI transport and a fake engine, governed
    (key cache hit, admission, settling, tenant stamp) vs open, sequentially; no network, no
    worker, so machine load hardly blurs the difference."""
    from lmaas.api.app import create_app
    from lmaas.api.services import ApiServices
    from lmaas.gateway.limits import Limits
    from lmaas.gateway.service import GovernanceService
    from lmaas.testing.fakes import FakeEngineClient

    with tempfile.TemporaryDirectory(prefix="lmaas-govbench-mem-") as tmp:
        governance = GovernanceService.open(f"sqlite:///{tmp}/lmaas.db", key_cache_ttl_s=5.0)
        try:
            governance.create_tenant("bench", limits=Limits(rpm=10**8, tpm=10**9))
            limits = Limits(rpm=10**8, tpm=10**9, max_concurrent=10**5)
            key = governance.create_key("bench", ["inference"], limits=limits).secret
            engine = FakeEngineClient()
            apps = {
                "governed": (
                    create_app(ApiServices(engine=engine, auth=governance, governance=governance)),
                    {"Authorization": f"Bearer {key}"},
                ),
                "no_auth": (create_app(ApiServices(engine=engine)), {}),
            }
            body = {"model": "fake-embed", "input": BODY["input"]}
            latencies: dict[str, list[float]] = {name: [] for name in apps}
            for _round in range(4):
                for name, (app, headers) in apps.items():
                    transport = httpx.ASGITransport(app=app)
                    async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
                        for i in range(num_requests // 4 + 100):
                            start = time.perf_counter()
                            response = await c.post("/v1/embeddings", json=body, headers=headers)
                            if i >= 100:  # the first ones warm up
                                latencies[name].append(time.perf_counter() - start)
                            if response.status_code != 200:
                                raise SystemExit(f"in-process {name}: {response.text}")
        finally:
            governance.close()
    report: dict[str, Any] = {name: _percentiles(v) for name, v in latencies.items()}
    report["difference_ms"] = {
        q: report["governed"][q] - report["no_auth"][q] for q in ("p50_ms", "p90_ms", "p99_ms")
    }
    return report


def _usage_rows(home: Path, key_id: str, database_url: str | None = None) -> dict[str, Any]:
    """Rows of the metering table for one key, if this build meters at all."""
    from sqlalchemy import inspect, text

    from lmaas.registry.metadata import create_db_engine

    engine = create_db_engine(database_url or f"sqlite:///{home / 'lmaas.db'}")
    try:
        inspector = inspect(engine)
        if "usage" not in inspector.get_table_names():
            return {"metering": "metering not present"}
        columns = {c["name"] for c in inspector.get_columns("usage")}
        with engine.connect() as conn:
            total = conn.execute(text("SELECT COUNT(*) FROM usage")).scalar_one()
            mine = None
            if "key_id" in columns:
                query = text("SELECT COUNT(*) FROM usage WHERE key_id = :k")
                mine = conn.execute(query, {"k": key_id}).scalar_one()
        return {"metering": "present", "usage_rows": total, "usage_rows_admission_key": mine}
    finally:
        engine.dispose()


VARIANTS: dict[str, dict[str, Any]] = {
    "open": {"auth": False, "metering": False, "key": None},
    "open-twin": {"auth": False, "metering": False, "key": None},
    "auth": {"auth": True, "metering": False, "key": "plain"},
    "limits": {"auth": True, "metering": False, "key": "generous"},
    "governed": {"auth": True, "metering": True, "key": "generous"},
}
"""What each server under test runs with. ``open`` is governance disabled: ``--no-auth`` (no
key check, so no limits either) and metering off (``LMAAS_USAGE__ENABLED=false``). ``auth``:
keys checked, a key and tenant without limits, no metering. ``limits``: plus a key and tenant
with rpm, tpm, concurrency and daily/monthly quotas (all generous, so every request is admitted,
reserved and settled). ``governed``: plus metering (one usage row per request, batch-written).
``open-twin``: a second ``open`` server, the A/A control: its difference from ``open`` is
what two identical servers differ by on this machine (the noise floor)."""


def _postgres_schema(create: bool, schema: str, url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if create:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        else:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _create_keys(home: Path, database_url: str | None, rpm: int) -> dict[str, str]:
    """The generous key (limits and quotas that never bind), a plain one, the admission one."""

    def lmaas(*args: str) -> str:
        return _lmaas(home, *args, database_url=database_url)

    big = ("--rpm", "100000000", "--tpm", "1000000000")
    quotas = ("--quota-tokens", "1000000000000/month", "--quota-requests", "1000000000/day")
    lmaas("tenants", "create", "bench", *big)
    lmaas("tenants", "create", "plain")
    inference = ("keys", "create", "--scope", "inference")
    return {
        "generous": lmaas(
            *inference, "--tenant", "bench", *big, "--max-concurrent", "100000", *quotas
        ),
        "plain": lmaas(*inference, "--tenant", "plain"),
        "admission": lmaas(*inference, "--tenant", "bench", "--rpm", str(rpm)),
    }


def _start_servers(
    stack: ExitStack, home: Path, names: list[str], env: dict[str, str], tmp: Path
) -> dict[str, tuple[int, int]]:
    """``lmaas serve`` for each variant (the first with auth on creates the admin key);
    returns each one's port and gateway pid."""
    base = [sys.executable, "-m", "lmaas.cli", "serve", "--home", str(home), "--model", MODEL]
    started: dict[str, tuple[int, int]] = {}
    for name in sorted(names, key=lambda n: not VARIANTS[n]["auth"]):
        variant, port = VARIANTS[name], free_port()
        cmd = [*base, "--port", str(port), *([] if variant["auth"] else ["--no-auth"])]
        server_env = {**env, "LMAAS_USAGE__ENABLED": "true" if variant["metering"] else "false"}
        log = tmp / f"{name}.log"
        proc = stack.enter_context(server_process(cmd, log, server_env))
        why = wait_http(proc, f"http://127.0.0.1:{port}/v2/health/ready", 120, log)
        if why:
            raise SystemExit(f"the {name} server did not start: {why}")
        admin_key(log, tmp / "admin-key")
        started[name] = (port, proc.pid)
    return started


def _targets(started: dict[str, tuple[int, int]], keys: dict[str, str]) -> list[Target]:
    body = json.dumps(BODY).encode()
    targets = []
    for name, (port, pid) in started.items():
        key = VARIANTS[name]["key"]
        headers = {} if key is None else {"Authorization": f"Bearer {keys[key]}"}
        request = encode_request("127.0.0.1", port, "/v1/embeddings", body, headers)
        targets.append(Target(name, "127.0.0.1", port, request, pid))
    return targets


def _overhead(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    seconds, rounds = (4.0, 2) if args.quick else (args.round_seconds, args.rounds)
    print(
        f"overhead: {args.rate:g} req/s ({args.arrivals}), {rounds} rounds of {seconds:g} s "
        f"per server, order rotating{', SCHED_FIFO' if args.realtime else ''} ...",
        flush=True,
    )
    pids = [pid for target in targets for pid in descendants(target.pid)]
    if args.realtime:
        set_realtime(pids, True)
    try:
        rows = asyncio.run(interleaved(targets, args.rate, seconds, rounds, args.arrivals))
    finally:
        if args.realtime:
            set_realtime([p for t in targets for p in descendants(t.pid)], False)
    report = summarize(rows, baseline="open")
    report["rounds"] = [{k: v for k, v in row.items() if k != "_latencies"} for row in rows]
    diff = report["differences"].get("governed", {}).get("p50_ms")
    governed = report["servers"].get("governed")
    report["bar_p50_ms"] = 0.3
    report["rate_sustained"] = all(
        s["median_achieved_per_s"] >= 0.97 * args.rate for s in report["servers"].values()
    )
    report["meets_bar"] = bool(
        diff and governed and report["rate_sustained"] and diff["median"] <= 0.3
    )
    return report


def _print_overhead(overhead: dict[str, Any], rate: float) -> None:
    print(f"\nover loopback, real servers, {rate:g} req/s offered (medians over rounds):")
    head = "p50 ms  p90 ms  p99 ms  svc p50  req/s  gw CPU ms/req  worker  client  busy%"
    print(f"{'':9} {head}")
    for name, s in overhead["servers"].items():
        print(
            f"{name:9} {s['median_p50_ms']:6.3f} {s['median_p90_ms']:7.3f} "
            f"{s['median_p99_ms']:7.3f} {s['median_service_p50_ms']:8.3f} "
            f"{s['median_achieved_per_s']:6.1f} {s['median_gateway_cpu_ms_per_req']:14.3f} "
            f"{s['median_worker_cpu_ms_per_req']:7.3f} {s['median_client_cpu_ms_per_req']:7.3f} "
            f"{s['median_machine_busy_pct']:6.0f}"
        )
    for name, diff in overhead["differences"].items():
        p50, cpu = diff["p50_ms"], diff["gateway_cpu_ms_per_req"]
        print(
            f"{name} - open, paired by round: p50 {p50['median']:+.3f} ms "
            f"(range {p50['min']:+.3f} .. {p50['max']:+.3f}), p99 "
            f"{diff['p99_ms']['median']:+.3f} ms, gateway CPU {cpu['median']:+.3f} ms/req "
            f"(range {cpu['min']:+.3f} .. {cpu['max']:+.3f})"
        )
    verdict = "met" if overhead["meets_bar"] else "NOT met"
    sustained = "yes" if overhead["rate_sustained"] else "NO"
    print(f"bar (governed - open, p50 <= 0.3 ms at {rate:g}/s sustained: {sustained}): {verdict}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (2 rounds of 4 s)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s (overhead phase)")
    parser.add_argument("--round-seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server")
    parser.add_argument("--arrivals", choices=["constant", "poisson"], default="constant")
    parser.add_argument(
        "--variants",
        default="open,governed",
        help=f"comma-separated, from {', '.join(VARIANTS)} ('all': each); open is the baseline",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run the servers and the client SCHED_FIFO during the overhead rounds only "
        "(shields them from other work on a shared machine)",
    )
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--requests", type=int, help="admission phase requests (10000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--skip-admission", action="store_true")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--limits-backend", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    if "open" not in names or any(n not in VARIANTS for n in names):
        parser.error(f"--variants must include open and name only {', '.join(VARIANTS)}")
    args.names = [n for n in VARIANTS if n in names]
    return args


def main() -> None:
    args = _parse_args()
    total = args.requests or (1200 if args.quick else 10_000)
    rpm = max(10, total // 5)  # the limit binds: most requests must be refused
    report: dict[str, Any] = {
        "quick": args.quick,
        "limits_backend": args.limits_backend,
        "database": args.database,
        "realtime": args.realtime,
        "variants": args.names,
        "cpus": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if not args.skip_in_process:
        print("in-process gateway overhead (ASGI, fake engine) ...", flush=True)
        report["in_process"] = asyncio.run(_in_process(1200 if args.quick else 20_000))
    schema = f"lmaas_govbench_{os.getpid()}_{time.time_ns() % 10**9}"
    database_url = None
    if args.database == "postgres":
        _postgres_schema(True, schema, args.postgres_url)
        database_url = f"{args.postgres_url}?options=-csearch_path%3D{schema}"
    try:
        with tempfile.TemporaryDirectory(prefix="lmaas-govbench-") as tmp, ExitStack() as stack:
            home = Path(tmp) / "home"
            home.mkdir()
            _prepare_home(home, database_url)
            env = {**os.environ, "LMAAS_OFFLINE": "1", "LMAAS_LIMITS__BACKEND": args.limits_backend}
            env["LMAAS_REDIS_URL"] = args.redis_url
            env["LMAAS_LIMITS__KEY_PREFIX"] = f"lmaas-bench:{os.getpid()}:{time.time_ns()}"
            if database_url is not None:
                env["LMAAS_DATABASE_URL"] = database_url
            started = _start_servers(stack, home, args.names, env, Path(tmp))
            keys = _create_keys(home, database_url, rpm)
            report["overhead"] = _overhead(args, _targets(started, keys))
            if not args.skip_admission and "governed" in started:
                base = f"http://127.0.0.1:{started['governed'][0]}"
                print(f"admission: {total} requests at concurrency {args.concurrency}, rpm {rpm}")
                report["admission"] = asyncio.run(
                    _admission(base, keys["admission"], total, args.concurrency, rpm)
                )
                time.sleep(2.0)  # give the metering writer its flush interval
                key_id = keys["admission"].split("-")[1]
                report["metering"] = _usage_rows(home, key_id, database_url)
    finally:
        if args.database == "postgres":
            _postgres_schema(False, schema, args.postgres_url)
    _print_report(report, args.rate)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _print_report(report: dict[str, Any], rate: float) -> None:
    mem = report.get("in_process")
    if mem is not None:
        print(
            "\nin process: p50 governed {:.3f} ms, open {:.3f} ms, difference {:.3f} ms "
            "(p90 {:.3f} ms)".format(
                mem["governed"]["p50_ms"],
                mem["no_auth"]["p50_ms"],
                mem["difference_ms"]["p50_ms"],
                mem["difference_ms"]["p90_ms"],
            )
        )
    _print_overhead(report["overhead"], rate)
    admission = report.get("admission")
    if admission is None:
        return
    print(
        f"admission: {admission['admitted']} admitted of {admission['requests']} "
        f"(allowed at most {admission['allowed_at_most']}), over-admissions "
        f"{admission['over_admissions']}, statuses {admission['statuses']}, "
        f"429 without Retry-After {admission['429_without_retry_after']}, "
        f"{admission['requests_per_s']:.0f} req/s"
    )
    metering = report["metering"]
    if metering["metering"] == "present":
        print(
            f"metering: {metering['usage_rows']} usage rows, "
            f"{metering['usage_rows_admission_key']} for the admission key "
            f"(admitted: {admission['admitted']})"
        )
    else:
        print("metering not present")


if __name__ == "__main__":
    main()
