"""The C kernels (decode attention, RMSNorm): their formulas, where they apply, the runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paged_helpers import GREEDY, load_runner, random_prompts

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.llm.batch import SeqSlot, StepBatch
from lmaas.runtimes.llm.paged import cpu_kernels
from lmaas.runtimes.llm.paged.config import RopeConfig
from lmaas.runtimes.llm.paged.cpu_kernels import (
    build_cpu_kernels,
    kernel_mode,
    reference_attention,
)
from lmaas.runtimes.llm.paged.fused import add_rms_norm, rms_norm, rotary
from lmaas.runtimes.llm.paged.kv_cache import PagedKVCache
from lmaas.runtimes.llm.paged.rope import RopeTable

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(
    cpu_kernels._compiler() is None, reason="no C compiler (cc/gcc) on this machine"
)


def _kernel(head_dim: int, group: int) -> cpu_kernels.CpuKernels:
    kernel = build_cpu_kernels(
        head_dim=head_dim, group=group, dtype=torch.bfloat16, device=CPU, mode="on"
    )
    assert kernel is not None
    return kernel


@needs_compiler
@pytest.mark.parametrize(("head_dim", "group"), [(64, 3), (128, 4), (32, 1), (48, 2)])
def test_kernel_matches_the_float32_formula_over_scattered_blocks(
    head_dim: int, group: int
) -> None:
    kernel = _kernel(head_dim, group)
    generator = torch.Generator().manual_seed(head_dim + group)
    kv_heads, block_size, num_blocks = 2, 8, 40
    heads = kv_heads * group
    layer_kv = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=generator)
    layer_kv = layer_kv.to(torch.bfloat16)
    contexts = torch.tensor([1, 8, 9, 31, 64], dtype=torch.long)  # block edges on either side
    tables = torch.randperm(num_blocks, generator=generator)[:40].view(5, 8).contiguous()
    # Queries as the model hands them over: a slice of the packed q/k/v rows (strided rows).
    qkv = torch.randn(5, heads + 2 * kv_heads, head_dim, generator=generator).to(torch.bfloat16)
    q = qkv[:, :heads]
    got = kernel.attention(q, layer_kv, tables, contexts, 64, head_dim**-0.5)
    want = reference_attention(q, layer_kv, tables, contexts, head_dim**-0.5)
    assert got.shape == (5, heads * head_dim) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    # A context of one attends to that position alone: the output is its value row.
    value = layer_kv[1][:, tables[0, 0], 0]  # [kv_heads, head_dim]
    torch.testing.assert_close(
        got[0].view(kv_heads, group, head_dim).float(),
        value.float().unsqueeze(1).expand(kv_heads, group, head_dim),
    )


@needs_compiler
@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_rms_norm_kernels_round_like_the_eager_ops(rows: int) -> None:
    kernel = _kernel(64, 2)
    generator = torch.Generator().manual_seed(rows)
    hidden, delta = (torch.randn(rows, 384, generator=generator).to(torch.bfloat16) for _ in "hd")
    weight = torch.randn(384, generator=generator).to(torch.bfloat16)
    summed, x = kernel.add_rms_norm(hidden, delta, weight, 1e-5)
    want_summed, want_x = add_rms_norm(hidden, delta, weight, 1e-5)
    assert torch.equal(summed, want_summed)  # the residual add rounds exactly as eager
    # Same roundings; only the order of the sum of squares differs (a last-bit flip at most).
    torch.testing.assert_close(x, want_x, atol=0, rtol=2**-7)
    torch.testing.assert_close(
        kernel.rms_norm(hidden, weight, 1e-5), rms_norm(hidden, weight, 1e-5), atol=0, rtol=2**-7
    )
    # Strided rows are copied first, not misread.
    wide = torch.randn(rows, 768, generator=generator).to(torch.bfloat16)
    torch.testing.assert_close(
        kernel.rms_norm(wide[:, ::2], weight, 1e-5),
        rms_norm(wide[:, ::2], weight, 1e-5),
        atol=0,
        rtol=2**-7,
    )


@needs_compiler
@pytest.mark.parametrize("tokens", [1, 70])  # 70: the parallel loop
def test_rotary_to_cache_is_eager_rope_then_the_cache_write(tokens: int) -> None:
    kernel = _kernel(64, 3)
    generator = torch.Generator().manual_seed(tokens)
    kv_heads, heads, block_size, num_blocks = 2, 6, 8, 12
    cache, want_cache = (
        PagedKVCache(
            num_layers=2,
            num_kv_heads=kv_heads,
            head_dim=64,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=torch.bfloat16,
            device=CPU,
        )
        for _ in range(2)
    )
    qkv = torch.randn(tokens, heads + 2 * kv_heads, 64, generator=generator).to(torch.bfloat16)
    table = RopeTable(RopeConfig(theta=10000.0), 64, 128, torch.bfloat16, CPU)
    positions = torch.randint(0, 128, (tokens,), generator=generator)
    cos, sin = table.lookup(positions)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    q = kernel.rotary_to_cache(qkv, cos, sin, cache.layer(1), slots)
    want_q, k, v = rotary(qkv, cos, sin, None, heads, kv_heads, 1e-6)
    want_cache.write(1, k, v, slots)
    assert torch.equal(q, want_q)  # the same roundings, bit for bit
    assert torch.equal(cache.storage, want_cache.storage)  # layer 0 untouched too


def test_kernel_refuses_operands_it_cannot_address() -> None:
    kernel = _kernel(64, 2)
    layer_kv = torch.zeros(2, 1, 4, 8, 64, dtype=torch.bfloat16)
    tables = torch.zeros(1, 1, dtype=torch.long)
    contexts = torch.ones(1, dtype=torch.long)
    transposed = torch.zeros(1, 64, 2, dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(ValueError, match="layout"):
        kernel.attention(transposed, layer_kv, tables, contexts, 1, 0.125)


def test_where_the_kernel_does_not_apply() -> None:
    for dtype in (torch.float32, torch.float16):
        assert build_cpu_kernels(head_dim=64, group=2, dtype=dtype, device=CPU) is None
    assert (
        build_cpu_kernels(head_dim=64, group=2, dtype=torch.bfloat16, device=CPU, mode="off")
        is None
    )
    assert build_cpu_kernels(head_dim=72, group=2, dtype=torch.bfloat16, device=CPU) is None
    with pytest.raises(ModelLoadError, match="cpu_kernels=on"):
        build_cpu_kernels(head_dim=64, group=2, dtype=torch.float32, device=CPU, mode="on")


def test_a_compiler_that_fails_keeps_the_matmul_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")  # on PATH, exits 1
    assert build_cpu_kernels(head_dim=64, group=2, dtype=torch.bfloat16, device=CPU) is None
    with pytest.raises(ModelLoadError, match="false failed"):
        build_cpu_kernels(head_dim=64, group=2, dtype=torch.bfloat16, device=CPU, mode="on")


def test_serving_option_values() -> None:
    assert kernel_mode({}) == "auto"
    assert kernel_mode({"cpu_kernels": " OFF "}) == "off"
    with pytest.raises(ModelLoadError, match="cpu_kernels must be one of"):
        kernel_mode({"cpu_kernels": "fast"})


@needs_compiler
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])  # qwen3: q/k norms, eager RoPE
def test_runner_with_the_kernels_matches_the_torch_paths(
    tiny_lm_dirs: dict[str, Path], family: str
) -> None:
    """A prefill, a mixed step (a decode row beside a prefill chunk) and a decode-only step in
    bf16: the C kernels and the torch paths give the same logits within bf16 tolerance."""
    model_dir = tiny_lm_dirs[family]
    with_kernel, _ = load_runner(model_dir, dtype="bfloat16")
    without, _ = load_runner(model_dir, dtype="bfloat16", options={"cpu_kernels": "off"})
    assert with_kernel.cpu_kernels and not without.cpu_kernels
    prompts = random_prompts([11, 6, 19], with_kernel.config.vocab_size, seed=5)
    tables = [[0, 1], [2], [3, 4, 5]]
    steps = [
        # sequence 0 prefills; then it decodes beside 2's prefill; then both decode
        [SeqSlot(0, prompts[0], 0, tables[0], True, GREEDY)],
        [
            SeqSlot(0, [7], 11, tables[0], True, GREEDY),
            SeqSlot(2, prompts[2], 0, tables[2], True, GREEDY),
        ],
        [
            SeqSlot(0, [9], 12, tables[0], True, GREEDY),
            SeqSlot(2, [3], 19, tables[2], True, GREEDY),
        ],
    ]
    for slots in steps:
        ours = with_kernel.compute_logits(StepBatch(slots))
        ref = without.compute_logits(StepBatch(slots))
        diff = (torch.log_softmax(ours, -1) - torch.log_softmax(ref, -1)).abs().max()
        assert diff < 0.05
