"""Linear layers: oneDNN-packed in bf16 on CPUs, identical to F.linear either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmaas.runtimes.llm.paged.models.linear import GatedLinear, Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_linear_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 48, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    x = torch.randn(rows, 48, generator=generator).to(dtype)
    torch.testing.assert_close(Linear(weight, bias)(x), F.linear(x, weight, bias))
    torch.testing.assert_close(Linear(weight)(x), F.linear(x, weight))


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_gated_linear_bf16_epilogues_match_a_float32_reference(biases: bool, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    gate, up = (torch.randn(128, 48, generator=generator) * 0.2 for _ in range(2))
    gate_bias, up_bias = (torch.randn(128, generator=generator) if biases else None for _ in "gu")
    x = torch.randn(rows, 48, generator=generator)
    want = F.silu(F.linear(x, gate, gate_bias)) * F.linear(x, up, up_bias)

    def bf16(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(torch.bfloat16)

    gated = GatedLinear(bf16(gate), bf16(up), bf16(gate_bias), bf16(up_bias))  # type: ignore[arg-type]
    # Where oneDNN packs bf16 weights, SiLU and the product run inside the two matmuls.
    assert gated.fused_epilogues == Linear(gate.to(torch.bfloat16)).packed
    got = gated(x.to(torch.bfloat16), _silu_mul).float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


def test_gated_linear_float32_is_one_fused_matmul_and_act_mul() -> None:
    generator = torch.Generator().manual_seed(0)
    gate, up = torch.randn(96, 48, generator=generator), torch.randn(96, 48, generator=generator)
    up_bias = torch.randn(96, generator=generator)  # a bias on one half only
    x = torch.randn(7, 48, generator=generator)
    gated = GatedLinear(gate, up, None, up_bias)
    assert not gated.fused_epilogues
    want = F.silu(F.linear(x, gate)) * F.linear(x, up, up_bias)
    torch.testing.assert_close(gated(x, _silu_mul), want)


def test_gated_linear_other_activations_keep_the_reference_path() -> None:
    generator = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(64, 32, generator=generator).to(torch.bfloat16) for _ in range(2))
    x = torch.randn(3, 32, generator=generator).to(torch.bfloat16)
    gated = GatedLinear(gate, up, silu=False)
    assert not gated.fused_epilogues

    def gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        g, u = gate_up.chunk(2, dim=-1)
        return F.gelu(g) * u

    want = F.gelu(F.linear(x, gate)) * F.linear(x, up)
    torch.testing.assert_close(gated(x, gelu_mul), want)
