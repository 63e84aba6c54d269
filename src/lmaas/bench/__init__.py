"""Serving benchmarks: a load generator for OpenAI-compatible servers and roofline helpers.

The load generator (:func:`run_benchmark`) is plain Python: a raw HTTP/1.1 client on asyncio
by default (:mod:`lmaas.bench.rawclient`), httpx on request; :mod:`lmaas.bench.roofline` needs
torch and imports it only when its functions run.
"""

from lmaas.bench.metrics import Aggregate, LatencyStats, RequestOutcome
from lmaas.bench.report import result_dict, result_table, write_json
from lmaas.bench.serve import BenchConfig, BenchResult, run_benchmark

__all__ = [
    "Aggregate",
    "BenchConfig",
    "BenchResult",
    "LatencyStats",
    "RequestOutcome",
    "result_dict",
    "result_table",
    "run_benchmark",
    "write_json",
]
