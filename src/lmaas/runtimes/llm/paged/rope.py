"""Rotary position embeddings: one cos/sin table per model, indexed by position each step."""

from __future__ import annotations

import math

import torch

from lmaas.runtimes.llm.paged.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies, computed as transformers does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_frequencies(rope, inv_freq)
    return inv_freq


def _llama3_frequencies(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_positions
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeTable:
    """Precomputed ``cos`` and signed ``sin`` for every position up to ``max_positions``.

    The rotation ``x * cos + rotate_half(x) * sin`` is computed as
    ``x * cos + roll(x, d/2) * sin_signed`` with ``sin_signed = cat(-sin, sin)``: one roll
    instead of slice/neg/cat, and bit-identical (negation is exact).
    """

    __slots__ = ("cos", "sin_signed")

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        inv_freq = inverse_frequencies(rope, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        # transformers rounds cos/sin to the model dtype before rotating; so do we.
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        self.cos = torch.cat((cos, cos), dim=-1).to(device)
        self.sin_signed = torch.cat((-sin, sin), dim=-1).to(device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin_signed)`` rows for ``positions``, shaped ``[T, 1, head_dim]``."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[T, heads, head_dim]``) by the looked-up ``cos``/``sin_signed``."""
    half = x.shape[-1] // 2
    return x * cos + torch.roll(x, half, dims=-1) * sin_signed
