"""The decoder shape, read from a Hugging Face ``config.json`` without transformers.

Both config generations are understood: transformers 4 (``rope_theta`` + ``rope_scaling``) and
transformers 5 (``rope_parameters``). Whatever this module cannot reproduce exactly is refused
with :class:`ModelLoadError` rather than served with silently wrong outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.core.errors import ModelLoadError

LLAMA_STYLE = "llama"
GPT2_STYLE = "gpt2"

_ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA_STYLE,
    "MistralForCausalLM": LLAMA_STYLE,
    "Qwen2ForCausalLM": LLAMA_STYLE,
    "Qwen3ForCausalLM": LLAMA_STYLE,
    "GPT2LMHeadModel": GPT2_STYLE,
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_MODEL_TYPES |= {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_MODEL_TYPES |= {"gpt2": "GPT2LMHeadModel"}
_ROPE_TYPES = frozenset({"default", "linear", "llama3"})
_ACTIVATIONS = frozenset({"silu", "gelu", "gelu_new", "gelu_pytorch_tanh"})


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """Rotary embedding parameters (``default``, ``linear`` and ``llama3`` types)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(slots=True, frozen=True)
class DecoderConfig:
    """Everything the paged models need to know about a checkpoint's shape."""

    architecture: str
    """The HF class name, e.g. ``Qwen2ForCausalLM``."""
    style: str
    """``llama`` (RMSNorm, RoPE, gated MLP) or ``gpt2`` (LayerNorm, learned positions)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_positions: int
    """Longest context the model supports (capped by an active sliding window)."""
    tie_word_embeddings: bool
    hidden_act: str
    rope: RopeConfig | None = None
    qk_norm: bool = False
    """Qwen3: RMSNorm over each query/key head before RoPE."""
    scale_attn_weights: bool = True
    """GPT-2 option: scale attention scores by ``1 / sqrt(head_dim)`` (always on elsewhere)."""
    scale_attn_by_inverse_layer_idx: bool = False
    """GPT-2 option: divide layer ``i``'s attention scores by ``i + 1``."""


def read_decoder_config(model_dir: Path) -> DecoderConfig:
    """Parse ``model_dir/config.json``.

    Raises:
        ModelLoadError: missing or malformed config, unknown architecture, or a feature this
            runner does not implement (rope type, activation, partial rotary).
    """
    path = model_dir / "config.json"
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    architecture = _architecture_of(raw)
    try:
        if _ARCHITECTURES[architecture] == GPT2_STYLE:
            return _gpt2_config(raw, architecture)
        return _llama_config(raw, architecture)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"malformed {path} for {architecture}: {exc!r}") from exc


def _architecture_of(raw: dict[str, Any]) -> str:
    names = list(raw.get("architectures") or [])
    if not names and raw.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[raw["model_type"]]]
    for name in names:
        if name in _ARCHITECTURES:
            return str(name)
    shown = ", ".join(map(str, names)) or f"model_type {raw.get('model_type')!r}"
    raise ModelLoadError(
        f"architecture {shown} is not supported by the paged runner; "
        f"supported: {', '.join(sorted(_ARCHITECTURES))}"
    )


def _llama_config(raw: dict[str, Any], architecture: str) -> DecoderConfig:
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    max_positions = int(raw.get("max_position_embeddings") or 0)
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", architecture == "MistralForCausalLM")
    if window and uses_window:
        # Exact without window masking as long as no context exceeds the window.
        max_positions = min(max_positions, int(window)) if max_positions else int(window)
    act = str(raw.get("hidden_act", "silu"))
    _check_activation(act)
    return DecoderConfig(
        architecture=architecture,
        style=LLAMA_STYLE,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(raw["intermediate_size"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_positions=max_positions,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        hidden_act=act,
        rope=_rope_config(raw),
        qk_norm=architecture == "Qwen3ForCausalLM",
    )


def _gpt2_config(raw: dict[str, Any], architecture: str) -> DecoderConfig:
    hidden, heads = int(raw["n_embd"]), int(raw["n_head"])
    act = str(raw.get("activation_function", "gelu_new"))
    _check_activation(act)
    return DecoderConfig(
        architecture=architecture,
        style=GPT2_STYLE,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        max_positions=int(raw.get("n_positions") or raw.get("n_ctx") or 1024),
        tie_word_embeddings=True,
        hidden_act=act,
        scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx")),
    )


def _check_activation(act: str) -> None:
    if act not in _ACTIVATIONS:
        raise ModelLoadError(
            f"activation {act!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling: dict[str, Any] = dict(raw.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in _ROPE_TYPES:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(sorted(_ROPE_TYPES))}"
        )
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ModelLoadError(f"partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)),
    )
