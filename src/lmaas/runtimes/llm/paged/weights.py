"""Reading HF safetensors checkpoints (single file or sharded with an index) tensor by tensor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import ModelLoadError

_INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Opens every shard of a checkpoint once; :meth:`get` converts to the target dtype/device.

    Use as a context manager so the shards are closed when loading ends.
    """

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self._model_dir = model_dir
        self._dtype = dtype
        self._device = device
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> CheckpointReader:
        from safetensors import safe_open

        for shard in _shard_files(self._model_dir):
            try:
                handle = self._stack.enter_context(safe_open(str(shard), framework="pt"))
            except Exception as exc:  # safetensors raises its own SafetensorError
                self._stack.close()
                raise ModelLoadError(f"cannot open {shard}: {exc}") from exc
            names: list[str] = list(handle.keys())  # a safetensors handle is not iterable
            self._handles.update(dict.fromkeys(names, handle))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def has(self, name: str) -> bool:
        return name in self._handles

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in the compute dtype on the compute device.

        Raises:
            ModelLoadError: the checkpoint has no tensor of that name.
        """
        handle = self._handles.get(name)
        if handle is None:
            raise ModelLoadError(f"{self._model_dir}: checkpoint has no tensor {name!r}")
        tensor: torch.Tensor = handle.get_tensor(name)
        # copy=True: safetensors may hand out a view of its file mapping; a tensor kept as is
        # would keep the whole mapping (every page read while loading) resident for good.
        return tensor.to(device=self._device, dtype=self._dtype, copy=True).contiguous()

    def optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.has(name) else None

    def concat(self, names: Sequence[str]) -> torch.Tensor:
        """Tensors ``names`` stacked along dim 0 (fused projections: one matmul, not three)."""
        return torch.cat([self.get(name) for name in names], dim=0)


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / _INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"malformed {index}: {exc!r}") from exc
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise ModelLoadError(f"{index} names a shard outside the model: {name!r}")
        return [model_dir / name for name in names]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{model_dir} holds no *.safetensors weights")
    return shards
