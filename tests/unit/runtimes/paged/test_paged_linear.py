"""Linear layers: oneDNN-packed in bf16 on CPUs, identical to F.linear either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmaas.runtimes.llm.paged.models.linear import Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_linear_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 48, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype)
    x = torch.randn(rows, 48, generator=generator).to(dtype)
    torch.testing.assert_close(Linear(weight, bias)(x), F.linear(x, weight, bias))
    torch.testing.assert_close(Linear(weight)(x), F.linear(x, weight))
