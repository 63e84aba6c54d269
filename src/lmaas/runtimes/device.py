"""Device and dtype selection for torch runners."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from lmaas.core.errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# Native bf16 dot products; without them CPU bf16 matmuls are emulated and slower than fp32.
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (empty where unreadable)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is taken as a torch device.

    Raises:
        ModelLoadError: the device is unknown or CUDA is asked for but absent.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {requested!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available")
    return device


def resolve_dtype(
    requested: str, device: torch.device, *, prefer_float32_on_cpu: bool = False
) -> torch.dtype:
    """Pick the compute dtype.

    Args:
        requested: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (``fp32``/``bf16``/``fp16``
            also accepted). Explicit values are honoured.
        device: Where the model runs.
        prefer_float32_on_cpu: With ``auto`` on a CPU, stay in float32 (embedding quality).

    Raises:
        ModelLoadError: an unknown dtype name.
    """
    name = _DTYPE_ALIASES.get(requested, requested)
    if name in _DTYPES:
        return _DTYPES[name]
    if name != "auto":
        raise ModelLoadError(
            f"unknown dtype {requested!r}; expected auto, {', '.join(sorted(_DTYPES))}"
        )
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and not prefer_float32_on_cpu and cpu_flags() & _CPU_BF16_FLAGS:
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def configure_threads(num_threads: int | None = None) -> int:
    """Use every core this process may run on (a worker owns its process); returns the count."""
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    num_threads = max(1, num_threads)
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def num_threads_option(options: Mapping[str, str]) -> int | None:
    """The ``num_threads`` serving option, if set. Raises: ModelLoadError when not an integer."""
    value = options.get("num_threads")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ModelLoadError(f"serving option num_threads={value!r} is not an integer") from exc
