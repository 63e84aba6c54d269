"""Interleaved open-loop rounds against several servers, with the CPU each process spent.

Each round sends one server ``rate`` requests/s for ``seconds`` with the cheap open-loop client
of :mod:`lmaas.bench.openloop` (pre-encoded requests, keep-alive connections, latency from the
*due* time), and reads ``/proc`` before and after: CPU seconds of the server's gateway, of its
workers (the gateway's descendants) and of this client, and how busy the whole machine was.
Rounds visit the servers in rotating order (A B, B A, A B, ...), so drift in the machine's load
hits every server alike; governed-minus-open differences are taken per round (paired).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any

from lmaas.bench.openloop import Arrivals, OpenLoopConfig, OpenLoopResult, run_open_loop

_TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the gateway and its workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def set_realtime(pids: list[int], on: bool) -> None:
    """Every thread of ``pids`` (and of this process) to SCHED_FIFO 10, or back to normal."""
    policy, priority = (os.SCHED_FIFO, 10) if on else (os.SCHED_OTHER, 0)
    for pid in [*pids, os.getpid()]:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                os.sched_setscheduler(int(task), policy, os.sched_param(priority))
            except OSError:
                continue  # a thread that ended meanwhile


@dataclass(slots=True, frozen=True)
class Target:
    """One server under test."""

    name: str
    host: str
    port: int
    request: bytes
    pid: int
    """The gateway process (its workers are found below it each round)."""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else 0.0


def _round_row(
    target: Target, result: OpenLoopResult, cpu: dict[str, float], busy: float, rate: float
) -> dict[str, Any]:
    sent = max(1, result.sent)
    lat, svc, lag = result.latencies_s, result.service_s, result.send_lag_s
    return {
        "server": target.name,
        "rate": rate,
        "sent": result.sent,
        "ok": len(lat),
        "errors": result.errors,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "achieved_per_s": result.completed_per_s,
        "p50_ms": _pct(lat, 0.5),
        "p90_ms": _pct(lat, 0.9),
        "p99_ms": _pct(lat, 0.99),
        "service_p50_ms": _pct(svc, 0.5),
        "send_lag_p50_ms": _pct(lag, 0.5),
        "send_lag_p99_ms": _pct(lag, 0.99),
        "connections": result.connections_opened,
        "gateway_cpu_ms_per_req": cpu["gateway"] / sent * 1e3,
        "worker_cpu_ms_per_req": cpu["workers"] / sent * 1e3,
        "client_cpu_ms_per_req": cpu["client"] / sent * 1e3,
        "machine_busy_pct": busy * 100.0,
        "_latencies": lat,
    }


async def one_round(
    target: Target, rate: float, seconds: float, arrivals: Arrivals, seed: int
) -> dict[str, Any]:
    """Send ``target`` its round; the latencies and what each process spent."""
    pids = descendants(target.pid)
    before = {pid: cpu_seconds(pid) for pid in pids}
    mine, (busy0, total0) = os.times(), machine_jiffies()
    config = OpenLoopConfig(
        target.host, target.port, target.request, rate, seconds, arrivals, seed=seed
    )
    result = await run_open_loop(config)
    after = {pid: cpu_seconds(pid) for pid in pids}
    now, (busy1, total1) = os.times(), machine_jiffies()
    spent = {pid: after[pid] - before[pid] for pid in pids}
    cpu = {
        "gateway": spent[target.pid],
        "workers": sum(v for pid, v in spent.items() if pid != target.pid),
        "client": (now.user + now.system) - (mine.user + mine.system),
    }
    busy = (busy1 - busy0) / max(1, total1 - total0)
    return _round_row(target, result, cpu, busy, rate)


async def interleaved(
    targets: list[Target], rate: float, seconds: float, rounds: int, arrivals: Arrivals
) -> list[dict[str, Any]]:
    """``rounds`` rounds of every target, in rotating order, after an unmeasured warm-up."""
    for target in targets:
        await one_round(target, rate, min(2.0, seconds), arrivals, seed=0)
    rows: list[dict[str, Any]] = []
    for index in range(rounds):
        shift = index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            row = await one_round(target, rate, seconds, arrivals, seed=index + 1)
            row["round"] = index
            rows.append(row)
            print(
                f"  round {index} {row['server']:9} p50 {row['p50_ms']:6.3f} ms  "
                f"p99 {row['p99_ms']:7.3f} ms  {row['achieved_per_s']:6.1f}/s  "
                f"gateway {row['gateway_cpu_ms_per_req']:.3f} ms CPU/req  "
                f"machine {row['machine_busy_pct']:.0f}% busy",
                flush=True,
            )
    return rows


_COLUMNS = (
    "p50_ms", "p90_ms", "p99_ms", "service_p50_ms", "achieved_per_s", "send_lag_p50_ms",
    "gateway_cpu_ms_per_req", "worker_cpu_ms_per_req", "client_cpu_ms_per_req",
    "machine_busy_pct",
)  # fmt: skip


def summarize(rows: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Per server: medians over rounds, pooled percentiles; per other server: the paired
    (same round) differences from ``baseline``, median and range."""
    names = list(dict.fromkeys(row["server"] for row in rows))
    report: dict[str, Any] = {"servers": {}, "differences": {}}
    for name in names:
        mine = [row for row in rows if row["server"] == name]
        pooled = [v for row in mine for v in row["_latencies"]]
        summary = {f"median_{c}": statistics.median(r[c] for r in mine) for c in _COLUMNS}
        summary |= {
            "rounds": len(mine),
            "ok": sum(r["ok"] for r in mine),
            "sent": sum(r["sent"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "pooled_p50_ms": _pct(pooled, 0.5),
            "pooled_p90_ms": _pct(pooled, 0.9),
            "pooled_p99_ms": _pct(pooled, 0.99),
        }
        report["servers"][name] = summary
    base = {row["round"]: row for row in rows if row["server"] == baseline}
    for name in names:
        if name == baseline:
            continue
        diffs: dict[str, list[float]] = {}
        for row in rows:
            if row["server"] == name and row["round"] in base:
                for column in ("p50_ms", "p90_ms", "p99_ms", "gateway_cpu_ms_per_req"):
                    diffs.setdefault(column, []).append(row[column] - base[row["round"]][column])
        report["differences"][name] = {
            column: {"median": statistics.median(v), "min": min(v), "max": max(v), "each": v}
            for column, v in diffs.items()
        }
    return report
