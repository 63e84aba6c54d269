"""This machine's matmul and memory-bandwidth ceilings, and how close a decode rate comes to them.

The measurement needs torch, which this package otherwise never imports: the functions import it
when called, from a process that has it (the comparison script in ``benchmarks/``). The contract
in ``.importlinter`` names this one exception.

A decode step of a dense model with ``P`` matmul parameters costs ``2·P`` FLOPs per token and
reads every weight once per step (KV-cache reads are left out, which makes the bandwidth
ceiling a little optimistic for long contexts). So for batch ``B``::

    compute ceiling   = peak FLOP/s / (2·P)                    tokens/s
    bandwidth ceiling = B · bandwidth / (P · bytes per weight)  tokens/s
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_MATMUL_SHAPES = ((64, 768, 2048), (256, 768, 2048))
"""(m, k, n): decode-like GEMMs of the 125M benchmark model, at batch 64 and 256."""


@dataclass(slots=True, frozen=True)
class MachinePeaks:
    """Measured ceilings of one device."""

    device: str
    dtype: str
    matmul_flops: float
    """Best matmul rate over the shapes tried, in FLOP/s."""
    bandwidth_bytes_s: float
    """Best of the read (sum) and copy rates, in bytes/s."""
    details: dict[str, float]
    """Every measurement: ``matmul MxKxN`` in GFLOP/s, ``read`` / ``copy`` in GB/s."""


@dataclass(slots=True, frozen=True)
class RooflineFractions:
    """A measured decode rate against both ceilings."""

    tokens_per_s: float
    compute_ceiling_tok_s: float
    bandwidth_ceiling_tok_s: float

    @property
    def compute_fraction(self) -> float:
        return self.tokens_per_s / self.compute_ceiling_tok_s

    @property
    def bandwidth_fraction(self) -> float:
        return self.tokens_per_s / self.bandwidth_ceiling_tok_s

    def describe(self) -> str:
        """One line for a report."""
        return (
            f"{self.tokens_per_s:,.1f} tok/s = {self.compute_fraction:.1%} of the compute "
            f"ceiling ({self.compute_ceiling_tok_s:,.0f} tok/s), "
            f"{self.bandwidth_fraction:.1%} of the bandwidth ceiling "
            f"({self.bandwidth_ceiling_tok_s:,.0f} tok/s)"
        )


def roofline(
    num_params: int, dtype_bytes: int, batch_size: int, tokens_per_s: float, peaks: MachinePeaks
) -> RooflineFractions:
    """Compare ``tokens_per_s`` with the compute and bandwidth ceilings.

    Args:
        num_params: Matmul parameters read every step (leave out the input embedding, which is
            a gather of a few rows).
        dtype_bytes: Bytes per weight (2 for bf16).
        batch_size: Sequences decoded together per step.
        tokens_per_s: The measured output rate.
        peaks: This machine's ceilings, from :func:`measure_peaks`.
    """
    compute = peaks.matmul_flops / (2.0 * num_params)
    step_floor_s = num_params * dtype_bytes / peaks.bandwidth_bytes_s
    return RooflineFractions(tokens_per_s, compute, batch_size / step_floor_s)


def measure_peaks(
    device: str = "cpu", dtype: str = "bfloat16", min_time_s: float = 0.3
) -> MachinePeaks:
    """Time matmuls and large-tensor reads/copies on ``device``; keep the best of each.

    Args:
        device: ``cpu`` or ``cuda``.
        dtype: The matmul dtype (a ``torch`` dtype name).
        min_time_s: Each measurement repeats its operation for at least this long.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    big = 2048 if device == "cpu" else 8192
    details: dict[str, float] = {}
    shapes = (*_MATMUL_SHAPES, (big, big, big))
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=torch_dtype, device=device)
        b = torch.randn(k, n, dtype=torch_dtype, device=device)
        seconds = _time(partial(torch.matmul, a, b), device, min_time_s)
        details[f"matmul {m}x{k}x{n} GFLOP/s"] = 2.0 * m * k * n / seconds / 1e9
    num_bytes = (512 if device == "cpu" else 2048) << 20
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read_s = _time(lambda: src.sum(), device, min_time_s)
    copy_s = _time(lambda: dst.copy_(src), device, min_time_s)
    details["read GB/s"] = num_bytes / read_s / 1e9
    details["copy GB/s"] = 2 * num_bytes / copy_s / 1e9
    flops = max(v for k, v in details.items() if k.startswith("matmul")) * 1e9
    bandwidth = max(details["read GB/s"], details["copy GB/s"]) * 1e9
    return MachinePeaks(device, dtype, flops, bandwidth, details)


def _time(op: Callable[[], torch.Tensor], device: str, min_time_s: float) -> float:
    """Seconds per call of ``op``: the best of several timed batches after one warm-up call."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    op()
    sync()
    best = float("inf")
    deadline = perf_counter() + min_time_s
    calls = 1
    while True:
        start = perf_counter()
        for _ in range(calls):
            op()
        sync()
        best = min(best, (perf_counter() - start) / calls)
        if perf_counter() >= deadline:
            return best
        # Batches of about 20 ms keep the timer's own cost out of short operations.
        calls = max(1, int(0.02 / max(best, 1e-9)))
