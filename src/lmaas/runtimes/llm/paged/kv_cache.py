"""The paged KV cache: fixed-size blocks of keys and values for every layer.

Layout: one tensor ``[num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]``. Keeping
the KV head outermost within a layer means gathering a batch's blocks
(``cache[:, block_table]``) yields ``[kv_heads, batch, blocks, block_size, head_dim]``, which is
already the ``[kv_heads, batch, context, head_dim]`` operand of a batched attention matmul: one
copy per layer, no permute afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmaas.core.errors import ModelLoadError

_log = logging.getLogger(__name__)

DEFAULT_CPU_FRACTION = 0.25
"""Without a budget, the cache takes this share of ``MemAvailable`` on a CPU …"""
DEFAULT_CPU_CAP_BYTES = 8 << 30
"""… but never more than 8 GiB (a worker shares the box with the gateway and other workers)."""
DEFAULT_CUDA_FRACTION = 0.5
"""On CUDA, without a budget: this share of the free device memory after the weights loaded."""


class PagedKVCache:
    """Keys and values of every layer in ``num_blocks`` blocks of ``block_size`` positions.

    Zero-initialised: attention gathers whole blocks and masks the unused tail, and a masked
    probability of 0 times a NaN left in uninitialised memory would still be NaN.
    """

    __slots__ = ("_workspace", "block_size", "num_blocks", "num_kv_heads", "storage")

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        shape = (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        # Reused by every gather: a fresh multi-MB tensor per layer costs page faults each time.
        self._workspace = torch.empty(0, dtype=dtype, device=device)

    def layer(self, index: int) -> torch.Tensor:
        """``[2, kv_heads, num_blocks, block_size, head_dim]`` (keys, values) of one layer."""
        return self.storage[index]

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store ``keys``/``values`` (``[T, kv_heads, head_dim]``) at flat slots ``[T]``."""
        kv = self.storage[layer]
        heads, _, _, head_dim = kv.shape[1:]
        flat = kv.view(2, heads, -1, head_dim)
        flat[0].index_copy_(1, slot_mapping, keys.transpose(0, 1))
        flat[1].index_copy_(1, slot_mapping, values.transpose(0, 1))

    def gather_rows(self, block_table: torch.Tensor) -> torch.Tensor:
        """Row indices for :meth:`gather` (computed once per step, used by every layer)."""
        heads = torch.arange(2 * self.num_kv_heads, device=block_table.device)
        return (heads[:, None] * self.num_blocks + block_table.reshape(1, -1)).reshape(-1)

    def gather(
        self, layer: int, rows: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``batch`` sequences' blocks (``rows`` from :meth:`gather_rows`),
        each shaped ``[kv_heads, batch, blocks * block_size, head_dim]``.

        The result lives in a workspace that the next gather overwrites.
        """
        heads, size, head_dim = self.num_kv_heads, self.block_size, self.storage.shape[-1]
        # Whole blocks are rows of block_size * head_dim elements: index_select along dim 0
        # copies rows; the same gather along an inner dim measured ~3x slower.
        table = self.storage[layer].view(-1, size * head_dim)
        needed = rows.shape[0] * size * head_dim
        if self._workspace.numel() < needed:
            self._workspace = torch.empty(needed, dtype=table.dtype, device=table.device)
        out = self._workspace[:needed].view(rows.shape[0], size * head_dim)
        torch.index_select(table, 0, rows, out=out)
        kv = out.view(2, heads, batch, -1, head_dim)
        return kv[0], kv[1]

    def gather_into(self, layer: int, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Gather ``rows`` (from :meth:`gather_rows`) of ``layer`` into contiguous ``out``."""
        table = self.storage[layer].view(-1, self.block_size * self.storage.shape[-1])
        torch.index_select(table, 0, rows, out=out.view(rows.shape[0], -1))

    def gather_one(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values over ``blocks`` (``[n]``): ``[kv_heads, n * bs, d]``."""
        two, heads, num_blocks, size, head_dim = self.storage.shape[1:]
        rows = self.storage[layer].view(two * heads, num_blocks, size * head_dim)
        kv = rows.index_select(1, blocks).view(two, heads, blocks.shape[0] * size, head_dim)
        return kv[0], kv[1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block ``src`` into ``dst`` for every pair, in every layer (copy-on-write)."""
        if not pairs:
            return
        device = self.storage.device
        src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
        self.storage[:, :, :, dst] = self.storage[:, :, :, src]


def bytes_per_block(
    *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * block_size * head_dim * element_size


def default_budget_bytes(
    device: torch.device,
    meminfo: Path = Path("/proc/meminfo"),
    fraction: float | None = None,
) -> int:
    """The cache budget when no byte count is configured: ``fraction`` of free memory (the
    module defaults when None; an explicit fraction on a CPU is not capped at 8 GiB).

    Raises:
        ModelLoadError: free memory cannot be determined, or the fraction is out of (0, 1].
    """
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ModelLoadError(f"kv_cache_fraction must be in (0, 1], got {fraction}")
    if device.type == "cuda":
        free_bytes, _total = torch.cuda.mem_get_info(device)
        return int(free_bytes * (fraction or DEFAULT_CUDA_FRACTION))
    available = _mem_available_bytes(meminfo)
    if fraction is not None:
        return int(available * fraction)
    return min(int(available * DEFAULT_CPU_FRACTION), DEFAULT_CPU_CAP_BYTES)


def _mem_available_bytes(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"cannot read free memory from {meminfo}: {exc}") from exc
    raise ModelLoadError(f"{meminfo} has no MemAvailable line; set a KV cache budget")


def blocks_for_budget(
    budget_bytes: int, block_bytes: int, *, block_size: int, context_length: int
) -> int:
    """How many blocks fit ``budget_bytes``.

    Raises:
        ModelLoadError: not even one sequence of ``context_length`` tokens fits.
    """
    num_blocks = budget_bytes // block_bytes
    needed = -(-context_length // block_size)
    if num_blocks < needed:
        raise ModelLoadError(
            f"KV cache budget of {budget_bytes} bytes holds {num_blocks} blocks of {block_size} "
            f"tokens ({block_bytes} bytes each); one sequence of the context length "
            f"{context_length} needs {needed} blocks ({needed * block_bytes} bytes)"
        )
    _log.info("KV cache: %d blocks of %d tokens (%d bytes)", num_blocks, block_size, budget_bytes)
    return num_blocks
