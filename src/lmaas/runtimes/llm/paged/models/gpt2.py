"""GPT-2: learned positions, pre-norm LayerNorm blocks, fused c_attn, tied LM head.

GPT-2 checkpoints store their projections as ``Conv1D`` weights (``[in, out]``); they are
transposed once at load so every layer runs plain ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmaas.runtimes.llm.paged.attention import paged_attention
from lmaas.runtimes.llm.paged.config import DecoderConfig
from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.models.base import activation
from lmaas.runtimes.llm.paged.models.linear import Linear
from lmaas.runtimes.llm.paged.step import StepInputs
from lmaas.runtimes.llm.paged.weights import CheckpointReader


@dataclass(slots=True)
class _Layer:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    c_attn: Linear
    attn_proj: Linear
    ln_2: tuple[torch.Tensor, torch.Tensor]
    c_fc: Linear
    mlp_proj: Linear
    scale: float


class GPT2Model:
    """Implements :class:`~lmaas.runtimes.llm.paged.models.base.CausalModel`."""

    def __init__(
        self,
        config: DecoderConfig,
        reader: CheckpointReader,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        del dtype, device  # the reader already converts; kept for a uniform constructor
        self._config = config
        self._act = activation(config.hidden_act)
        # Hub checkpoints of the original GPT-2 omit the "transformer." prefix.
        prefix = "transformer." if reader.has("transformer.wte.weight") else ""
        self._wte = reader.get(prefix + "wte.weight")
        self._wpe = reader.get(prefix + "wpe.weight")
        self._lm_head = Linear(self._wte)
        self._ln_f = _norm(reader, prefix + "ln_f")
        self._layers = [
            _load_layer(config, reader, f"{prefix}h.{i}.", i) for i in range(config.num_layers)
        ]

    def hidden_states(self, inputs: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        config = self._config
        heads, head_dim, eps = config.num_heads, config.head_dim, config.norm_eps
        hidden = F.embedding(inputs.token_ids, self._wte) + F.embedding(inputs.positions, self._wpe)
        last = len(self._layers) - 1
        for index, layer in enumerate(self._layers):
            x = F.layer_norm(hidden, (config.hidden_size,), *layer.ln_1, eps)
            qkv = layer.c_attn(x).view(-1, 3 * heads, head_dim)
            attn = paged_attention(
                qkv[:, :heads],
                qkv[:, heads : 2 * heads],
                qkv[:, 2 * heads :],
                cache=cache,
                layer=index,
                inputs=inputs,
                scale=layer.scale,
            )
            rows = inputs.last_layer_rows if index == last else None
            if rows is not None:
                attn, hidden = attn[rows], hidden[rows]
            hidden = layer.attn_proj(attn) + hidden
            x = F.layer_norm(hidden, (config.hidden_size,), *layer.ln_2, eps)
            hidden = hidden + layer.mlp_proj(self._act(layer.c_fc(x)))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.layer_norm(
            hidden, (self._config.hidden_size,), *self._ln_f, self._config.norm_eps
        )
        return self._lm_head(hidden)


def _norm(reader: CheckpointReader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return reader.get(name + ".weight"), reader.get(name + ".bias")


def _conv1d(reader: CheckpointReader, name: str) -> Linear:
    return Linear(reader.get(name + ".weight").t().contiguous(), reader.get(name + ".bias"))


def _load_layer(config: DecoderConfig, reader: CheckpointReader, prefix: str, index: int) -> _Layer:
    scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= index + 1
    return _Layer(
        ln_1=_norm(reader, prefix + "ln_1"),
        c_attn=_conv1d(reader, prefix + "attn.c_attn"),
        attn_proj=_conv1d(reader, prefix + "attn.c_proj"),
        ln_2=_norm(reader, prefix + "ln_2"),
        c_fc=_conv1d(reader, prefix + "mlp.c_fc"),
        mlp_proj=_conv1d(reader, prefix + "mlp.c_proj"),
        scale=scale,
    )
