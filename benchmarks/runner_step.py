"""Time one engine step of the paged runner against HF transformers on the same model.

Builds the 125M Llama-shaped model of issue 3 (hidden 768, 12 layers, 12 heads, 4 KV heads,
intermediate 2048, vocab 32000, RANDOM weights, bf16) in a temp dir, then times:

* a decode step at batch 1, 16 and 64 with a context of ~133 tokens;
* a packed prefill of 64 sequences x 128 tokens;

through :class:`PagedModelRunner.compute_logits` and through HF ``model(...)`` with a
``DynamicCache`` of the same shape, and prints ms/step, tokens/s and the ratio. It also times
the attention variants the runner chose between. Not a test; run::

    .venv/bin/python benchmarks/runner_step.py [--steps 10] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.llm.batch import Sampled, SamplingConfig, SeqSlot, StepBatch
from lmaas.runtimes.llm.paged import PagedModelRunner
from lmaas.runtimes.llm.paged.decode_view import DEFAULT_VIEW_BYTES

BLOCK_SIZE = 16
CONTEXT = 133
PREFILL_LEN = 128
GREEDY = SamplingConfig(temperature=0.0)


class _ArgmaxSampler:
    """Steps are timed through ``compute_logits``; the sampler only satisfies the runner."""

    def sample(self, logits: torch.Tensor, slots: Sequence[SeqSlot]) -> list[Sampled]:
        return [Sampled(token_id=int(t)) for t in logits.argmax(-1).tolist()]

    def free(self, seq_ids: Iterable[int]) -> None:
        del seq_ids


def build_model(dest: Path, dtype: torch.dtype) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    # transformers ships partial annotations; from_config is untyped.
    model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model = model.to(dtype).eval()
    model.save_pretrained(str(dest), safe_serialization=True)
    return model


def timed(fn: Callable[[], object], steps: int, warmup: int = 2) -> float:
    """Fastest seconds per call of ``fn``: on a shared 2-core box the median mostly measures the
    neighbours (a descheduled OpenMP thread stalls every parallel op)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_batch(batch: int, context: int) -> StepBatch:
    """One decode token per sequence at ``context`` (blocks cover ``context + 64``)."""
    blocks_per_seq = math.ceil((context + 64) / BLOCK_SIZE)
    slots = [
        SeqSlot(
            i,
            [100 + i],
            context - 1,
            list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
            True,
            GREEDY,
        )
        for i in range(batch)
    ]
    return StepBatch(slots)


def decode_steps(runner: PagedModelRunner, batch: int, context: int) -> Callable[[], object]:
    """Successive decode steps from ``context`` on: each call advances every sequence by one
    token, as the engine's steady state does (the runner's decode view only appends then)."""
    step = decode_batch(batch, context)

    def run() -> object:
        result = runner.compute_logits(step)
        for slot in step.slots:
            slot.start_pos = context - 1 if slot.start_pos >= context + 60 else slot.start_pos + 1
        return result

    return run


def prefill_batch(batch: int, length: int) -> StepBatch:
    blocks_per_seq = math.ceil(length / BLOCK_SIZE)
    slots = [
        SeqSlot(
            i,
            [(7 * i + j) % 32000 for j in range(length)],
            0,
            list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
            True,
            GREEDY,
        )
        for i in range(batch)
    ]
    return StepBatch(slots)


def hf_decode_step(model: Any, batch: int, context: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(5, 32000, (batch, context - 1))
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        step_ids = torch.randint(5, 32000, (batch, 1))

        def step() -> None:
            model(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)

        return timed(step, steps)


def hf_prefill(model: Any, batch: int, length: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(5, 32000, (batch, length))
    with torch.inference_mode():
        # logits_to_keep=1: the LM head runs on the last position only, as in our runner.
        return timed(
            lambda: model(input_ids=ids, past_key_values=DynamicCache(), logits_to_keep=1),
            steps,
            warmup=1,
        )


def report(name: str, tokens: int, ours_s: float, hf_s: float) -> None:
    print(
        f"{name:<28} ours {ours_s * 1e3:8.1f} ms/step {tokens / ours_s:8.0f} tok/s | "
        f"HF {hf_s * 1e3:8.1f} ms/step {tokens / hf_s:8.0f} tok/s | x{hf_s / ours_s:.2f}"
    )


def decode_attention_variants(dtype: torch.dtype, steps: int) -> None:
    """Decode at batch 64, context 133: two matmuls + fp32 softmax (chosen) vs SDPA."""
    kv, group, d, batch, length = 4, 3, 64, 64, 144
    q = torch.randn(batch, kv * group, d, dtype=dtype)
    keys = torch.randn(kv, batch, length, d, dtype=dtype)
    values = torch.randn_like(keys)
    bias = torch.zeros(batch, 1, length)
    bias[:, :, CONTEXT:] = float("-inf")

    def matmul_decode() -> torch.Tensor:
        queries = q.view(batch, kv, group, d).transpose(0, 1)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * d**-0.5 + bias
        return torch.matmul(torch.softmax(scores, -1).to(dtype), values)

    mask = bias.view(batch, 1, 1, length) == 0
    keys4, values4 = keys.transpose(0, 1), values.transpose(0, 1)

    def sdpa_decode() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q.unsqueeze(2), keys4, values4, attn_mask=mask, enable_gqa=True
        )

    print(
        f"decode attention B=64 ctx={CONTEXT}: matmul {timed(matmul_decode, steps) * 1e3:.2f} ms, "
        f"SDPA {timed(sdpa_decode, steps) * 1e3:.2f} ms per layer"
    )


def prefill_attention_variants(dtype: torch.dtype, steps: int) -> None:
    """Fresh prefill 64 x 128: SDPA causal (chosen) vs two matmuls + fp32 softmax."""
    kv, group, d, batch, n = 4, 3, 64, 64, PREFILL_LEN
    q = torch.randn(batch, kv * group, n, d, dtype=dtype)
    keys = torch.randn(batch, kv, n, d, dtype=dtype)
    values = torch.randn_like(keys)
    causal = torch.full((n, n), float("-inf")).triu(1)

    def sdpa_prefill() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)

    def matmul_prefill() -> torch.Tensor:
        queries = q.view(batch, kv, group * n, d)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * d**-0.5
        scores = scores.view(batch, kv, group, n, n) + causal
        probs = torch.softmax(scores, -1).to(dtype).view(batch, kv, group * n, n)
        return torch.matmul(probs, values)

    print(
        f"prefill attention 64x{n}: SDPA {timed(sdpa_prefill, steps) * 1e3:.2f} ms, "
        f"matmul {timed(matmul_prefill, steps) * 1e3:.2f} ms per layer"
    )


def compare(runner: PagedModelRunner, model: Any, steps: int, skip_hf: bool) -> None:
    for batch in (1, 16, 64):
        ours = timed(decode_steps(runner, batch, CONTEXT), steps)
        hf = math.nan if skip_hf else hf_decode_step(model, batch, CONTEXT, steps)
        report(f"decode batch {batch} ctx {CONTEXT}", batch, ours, hf)
    prefill = prefill_batch(64, PREFILL_LEN)
    few = max(2, steps // 4)
    ours = timed(lambda: runner.compute_logits(prefill), few, warmup=1)
    hf = math.nan if skip_hf else hf_prefill(model, 64, PREFILL_LEN, few)
    report(f"prefill 64 x {PREFILL_LEN} packed", 64 * PREFILL_LEN, ours, hf)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), dtype)
        spec = WorkerSpec(
            model_name="bench", model_version="1", task="chat", format="safetensors",
            model_dir=tmp, files=[], requests_endpoint="", results_endpoint="",
            dtype=args.dtype, device="cpu",
        )  # fmt: skip
        runner = PagedModelRunner(spec, sampler=_ArgmaxSampler())
        runner.load()
        # The decode view is carved out of the budget: add it, so 1400 blocks remain.
        budget = 1400 * runner_block_bytes(runner) + DEFAULT_VIEW_BYTES
        runner.allocate_kv_cache(budget, BLOCK_SIZE)
        print(f"threads {torch.get_num_threads()}, dtype {args.dtype}; fastest of {args.steps}")
        decode_attention_variants(dtype, args.steps)
        prefill_attention_variants(dtype, args.steps)
        compare(runner, model, args.steps, args.skip_hf)


def runner_block_bytes(runner: PagedModelRunner) -> int:
    config = runner.config
    element = torch.empty((), dtype=runner.dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * BLOCK_SIZE * config.head_dim * element


if __name__ == "__main__":
    main()
