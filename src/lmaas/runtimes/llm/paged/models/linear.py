"""Linear layers with weights pre-packed for oneDNN on CPUs in bf16.

``F.linear`` in bf16 on a CPU reorders the weight into oneDNN's blocked layout on every call;
packing once at load time (what torch's inductor does when it freezes a model) measured 10-25%
faster for the 125M benchmark's shapes at batch 64 and ~2.5x at batch 1, with bit-identical
results. The op is private to torch, so it is probed at load and any failure or mismatch falls
back to plain ``F.linear``. float32 stays on ``F.linear`` (its MKL kernel is what transformers
runs, which the exact-equality tests rely on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

_log = logging.getLogger(__name__)
_PACK_BATCH_HINT = 64


class Linear:
    """``y = x @ weight.T + bias``; ``weight`` is ``[out_features, in_features]``."""

    __slots__ = ("_bias", "_packed", "_weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self._bias = bias
        self._packed = _try_pack(weight, bias)
        # Packed, the dense copy is dropped (unless the caller keeps it, e.g. tied embeddings).
        self._weight = weight if self._packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self._packed, self._bias, "none", [], ""
            )
            return out
        assert self._weight is not None  # one of the two is always set
        return F.linear(x, self._weight, self._bias)

    @property
    def packed(self) -> bool:
        """Whether the weight is packed for oneDNN (which :meth:`swish` and :meth:`times` need)."""
        return self._packed is not None

    def swish(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x @ weight.T + bias)`` in one oneDNN call (packed layers only)."""
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self._packed, self._bias, "swish", [], ""
        )
        return out

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``(x @ weight.T + bias) * other`` in one oneDNN call (packed layers only)."""
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
            x, other, self._packed, self._bias, "mul"
        )
        return out


class GatedLinear:
    """``act(x @ gate.T + gate_bias) * (x @ up.T + up_bias)``: the gated MLP's first half.

    Packed for oneDNN (bf16 on a CPU), the SiLU runs as the gate matmul's epilogue and the
    product as the up matmul's (the ``swish`` and binary ``mul`` post-ops), so no elementwise
    pass touches the ``[T, 2 * intermediate]`` activations: on the 125M benchmark's shapes the
    pair measured 8-12% faster than one fused gate/up matmul followed by ``silu_mul``, and closer
    to a float32 reference (each value is rounded once, not three times). Otherwise (float32, no
    oneDNN, a probe that disagrees) it is one fused gate/up matmul and ``act_mul`` on its output,
    the reference path (and the only one for activations other than SiLU, ``silu=False``).
    """

    __slots__ = ("_fused", "_gate", "_up")

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        gate_bias: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        *,
        silu: bool = True,
    ) -> None:
        self._fused: Linear | None = None
        self._gate: Linear | None = None
        self._up: Linear | None = None
        if silu:  # the only activation with an epilogue here
            self._gate, self._up = Linear(gate, gate_bias), Linear(up, up_bias)
            packed = self._gate.packed and self._up.packed
            if packed and _epilogues_agree(self, gate, up, gate_bias, up_bias):
                return
            self._gate = self._up = None
        self._fused = Linear(torch.cat((gate, up)), _joined_bias(gate, up, gate_bias, up_bias))

    @property
    def fused_epilogues(self) -> bool:
        """Whether SiLU and the product run inside the matmuls (the oneDNN path)."""
        return self._fused is None

    def __call__(
        self, x: torch.Tensor, act_mul: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``act_mul`` (``act(gate) * up`` of ``[T, 2 * intermediate]``) serves the unfused
        path only."""
        if self._fused is not None:
            return act_mul(self._fused(x))
        assert self._gate is not None and self._up is not None  # set together
        return self._up.times(x, self._gate.swish(x))


def _joined_bias(
    gate: torch.Tensor,
    up: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
) -> torch.Tensor | None:
    if gate_bias is None and up_bias is None:
        return None
    return torch.cat(
        (
            gate.new_zeros(gate.shape[0]) if gate_bias is None else gate_bias,
            up.new_zeros(up.shape[0]) if up_bias is None else up_bias,
        )
    )


def _epilogues_agree(
    gated: GatedLinear,
    gate: torch.Tensor,
    up: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
) -> bool:
    """Probe the post-ops once against float32 eager ops (a build without them, or with other
    semantics, keeps the reference path)."""
    probe = torch.randn(3, gate.shape[1], generator=torch.Generator().manual_seed(0))
    try:
        got = gated(probe.to(gate.dtype), lambda t: t).float()
    except (RuntimeError, AttributeError) as exc:
        _log.debug("oneDNN post-ops unavailable: %s", exc)
        return False
    g32 = F.linear(probe, gate.float(), None if gate_bias is None else gate_bias.float())
    u32 = F.linear(probe, up.float(), None if up_bias is None else up_bias.float())
    want = F.silu(g32) * u32
    return torch.allclose(got, want, atol=0.05 * float(want.abs().max()) + 1e-3, rtol=0.05)


def _try_pack(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.bfloat16
        # untyped in torch's stubs
        or not torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    ):
        return None
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
    except (RuntimeError, AttributeError) as exc:  # op missing from this torch build
        _log.debug("oneDNN weight packing unavailable: %s", exc)
        return None
    if not torch.allclose(got.float(), F.linear(probe, weight, bias).float(), atol=1e-2, rtol=1e-2):
        _log.debug("oneDNN packed linear disagrees with F.linear; not packing")
        return None
    return packed
