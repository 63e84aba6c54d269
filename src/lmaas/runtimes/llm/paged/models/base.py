"""What the runner needs from a model, and the numerics the families share."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.llm.paged.fused import rms_norm
from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.step import StepInputs

__all__ = ["Activation", "CausalModel", "activation", "rms_norm"]

Activation = Callable[[torch.Tensor], torch.Tensor]


class CausalModel(Protocol):
    """A decoder whose layers attend through a :class:`PagedKVCache`."""

    def hidden_states(self, inputs: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        """Run every layer over the packed new tokens; the hidden states of the sampled rows
        (``inputs.sample_rows``, in that order) before the final norm: ``[rows, hidden]``. Every
        row's keys and values reach the cache; the last layer's output projection and MLP run
        only for the sampled rows (``inputs.last_layer_rows``)."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head over the given rows: ``[rows, vocab]`` in the model dtype."""
        ...


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, formula for formula (bit-identical outputs in fp32).
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation(name: str) -> Activation:
    """The activation function called ``name`` in HF configs. Raises: ModelLoadError."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(f"activation {name!r} is not supported") from None
