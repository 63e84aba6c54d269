"""Llama-style decoders: Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Pre-norm RMSNorm blocks, RoPE, grouped-query attention and a gated MLP. At load time the q/k/v
projections are fused into one matrix; gate/up run as two matmuls with SiLU and the product in
their oneDNN epilogues (bf16 on CPUs), otherwise as one fused matmul (``linear.GatedLinear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.llm.paged.attention import kernel_attention, paged_attention
from lmaas.runtimes.llm.paged.config import DecoderConfig
from lmaas.runtimes.llm.paged.fused import EAGER, LayerKernels
from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.models.base import activation, rms_norm
from lmaas.runtimes.llm.paged.models.linear import GatedLinear, Linear
from lmaas.runtimes.llm.paged.rope import RopeTable
from lmaas.runtimes.llm.paged.step import StepInputs
from lmaas.runtimes.llm.paged.weights import CheckpointReader


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: Linear
    qk_norm: torch.Tensor | None
    """``[heads + kv_heads, head_dim]``: q_norm's weight per query head, k_norm's per KV head."""
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: GatedLinear
    down: Linear


class LlamaModel:
    """Implements :class:`~lmaas.runtimes.llm.paged.models.base.CausalModel`."""

    def __init__(
        self,
        config: DecoderConfig,
        reader: CheckpointReader,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if config.rope is None:
            raise ModelLoadError(f"{config.architecture} config has no rotary embedding")
        self._config = config
        self._act = activation(config.hidden_act)
        self._scale = config.head_dim**-0.5
        self._embed = reader.get("model.embed_tokens.weight")
        self._norm = reader.get("model.norm.weight")
        tied = config.tie_word_embeddings or not reader.has("lm_head.weight")
        self._lm_head = Linear(self._embed if tied else reader.get("lm_head.weight"))
        self._silu = config.hidden_act == "silu"
        self._layers = [
            _load_layer(config, reader, i, self._silu) for i in range(config.num_layers)
        ]
        self._rope = RopeTable(config.rope, config.head_dim, config.max_positions, dtype, device)
        self.kernels: LayerKernels = EAGER
        """The elementwise stages (``fused.py``); the runner swaps in compiled ones."""

    def hidden_states(self, inputs: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        config, kernels = self._config, self.kernels
        heads, kv_heads, eps = config.num_heads, config.num_kv_heads, config.norm_eps
        hidden = F.embedding(inputs.token_ids, self._embed)
        cos, sin = self._rope.lookup(inputs.positions)
        delta: torch.Tensor | None = None  # the MLP output, added in the next layer's norm
        last = len(self._layers) - 1
        for index, layer in enumerate(self._layers):
            if delta is None:
                x = kernels.rms_norm(hidden, layer.input_norm, eps)
            else:
                hidden, x = kernels.add_rms_norm(hidden, delta, layer.input_norm, eps)
            qkv = layer.qkv(x).view(-1, heads + 2 * kv_heads, config.head_dim)
            if inputs.kernel is not None and layer.qk_norm is None:
                # RoPE and the cache write in one C pass, then the C attention (cpu_kernels.py).
                layer_kv = cache.layer(index)
                q = inputs.kernel.rotary_to_cache(qkv, cos, sin, layer_kv, inputs.slot_mapping)
                attn = kernel_attention(q, cache, index, inputs, self._scale)
            else:
                q, k, v = kernels.rotary(qkv, cos, sin, layer.qk_norm, heads, kv_heads, eps)
                attn = paged_attention(
                    q,
                    k,
                    v,
                    cache=cache,
                    layer=index,
                    inputs=inputs,
                    scale=self._scale,
                    softmax=kernels.decode_softmax,
                )
            rows = inputs.last_layer_rows if index == last else None
            if rows is not None:
                attn, hidden = attn[rows], hidden[rows]
            hidden, x = kernels.add_rms_norm(hidden, layer.o_proj(attn), layer.post_norm, eps)
            delta = layer.down(layer.gate_up(x, self._act_mul))
        return hidden if delta is None else hidden + delta

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(rms_norm(hidden, self._norm, self._config.norm_eps))

    def _act_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._silu:
            return self.kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self._act(gate) * up


def _load_layer(config: DecoderConfig, reader: CheckpointReader, index: int, silu: bool) -> _Layer:
    prefix = f"model.layers.{index}."
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    qkv_names = [f"{attn}{p}_proj.weight" for p in ("q", "k", "v")]
    bias_names = [f"{attn}{p}_proj.bias" for p in ("q", "k", "v")]
    qkv_bias = reader.concat(bias_names) if reader.has(bias_names[0]) else None
    gate_bias, up_bias = (
        reader.optional(mlp + "gate_proj.bias"),
        reader.optional(mlp + "up_proj.bias"),
    )
    return _Layer(
        input_norm=reader.get(prefix + "input_layernorm.weight"),
        qkv=Linear(reader.concat(qkv_names), qkv_bias),
        qk_norm=_qk_norm(config, reader, attn) if config.qk_norm else None,
        o_proj=Linear(reader.get(attn + "o_proj.weight"), reader.optional(attn + "o_proj.bias")),
        post_norm=reader.get(prefix + "post_attention_layernorm.weight"),
        gate_up=GatedLinear(
            reader.get(mlp + "gate_proj.weight"),
            reader.get(mlp + "up_proj.weight"),
            gate_bias,
            up_bias,
            silu=silu,
        ),
        down=Linear(reader.get(mlp + "down_proj.weight"), reader.optional(mlp + "down_proj.bias")),
    )


def _qk_norm(config: DecoderConfig, reader: CheckpointReader, attn: str) -> torch.Tensor:
    q_weight = reader.get(attn + "q_norm.weight")
    k_weight = reader.get(attn + "k_norm.weight")
    return torch.cat(
        (
            q_weight.expand(config.num_heads, config.head_dim),
            k_weight.expand(config.num_kv_heads, config.head_dim),
        )
    )
