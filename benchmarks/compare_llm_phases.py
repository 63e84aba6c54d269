"""The torch-side phases of ``compare_llm.py``, each run in its own child process.

A child process per phase bounds its time (the parent kills it at the deadline), keeps one
phase's memory and threads from disturbing the next, and leaves the parent free of torch.
Each phase prints one line ``RESULT <json>`` on stdout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmaas.bench.prompts import token_id_prompts

RESULT_PREFIX = "RESULT "


def run_phase(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run phase ``name`` with ``args``; return its JSON-ready result."""
    phases = {
        "build": _build,
        "roofline": _roofline,
        "hf-static": _hf_static,
        "hf-generate-batch": _hf_generate_batch,
    }
    return phases[name](args)


def _build(args: dict[str, Any]) -> dict[str, Any]:
    from lmaas.testing.tiny_models import build_bench_llama

    dest = build_bench_llama(Path(args["dest"]))
    return {"model_dir": str(dest)}


def _roofline(args: dict[str, Any]) -> dict[str, Any]:
    from lmaas.bench.roofline import measure_peaks

    peaks = measure_peaks(args["device"], "bfloat16")
    return {
        "device": peaks.device,
        "matmul_flops": peaks.matmul_flops,
        "bandwidth_bytes_s": peaks.bandwidth_bytes_s,
        "details": peaks.details,
    }


def _load_model(model_dir: str, device: str, **kwargs: Any) -> Any:
    import torch
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs)
    return model.to(device).eval()


def _prompt_ids(args: dict[str, Any], count: int) -> list[list[int]]:
    # The same seed and vocabulary as the HTTP runs: the very same prompts.
    prompts = token_id_prompts(count, args["input_len"], args["vocab_size"], args["seed"])
    return [list(p.token_ids or []) for p in prompts]


def _generate_s(model: Any, ids: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Seconds for one static-batch greedy ``generate`` of exactly ``new_tokens``; tokens made."""
    import torch

    input_ids = torch.tensor(ids, device=model.device)
    mask = torch.ones_like(input_ids)
    pad = model.generation_config.pad_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, int((out.shape[1] - input_ids.shape[1]) * out.shape[0])


def _hf_static(args: dict[str, Any]) -> dict[str, Any]:
    model = _load_model(args["model_dir"], args["device"])
    output_len = args["output_len"]
    batch = _prompt_ids(args, args["batch_requests"])
    _generate_s(model, [row[:8] for row in batch[:2]], 2)  # warm-up
    batch_s, batch_tokens = _generate_s(model, batch, output_len)
    singles = []
    for ids in _prompt_ids(args, args["single_requests"]):
        prefill_s, _ = _generate_s(model, [ids], 1)
        total_s, tokens = _generate_s(model, [ids], output_len)
        singles.append({"total_s": total_s, "prefill_s": prefill_s, "tokens": tokens})
    decode_s = sum(s["total_s"] - s["prefill_s"] for s in singles)
    decode_tokens = sum(s["tokens"] - 1 for s in singles)
    return {
        "batch_size": len(batch),
        "batch_seconds": batch_s,
        "batch_output_tokens": batch_tokens,
        "batch_output_throughput": batch_tokens / batch_s,
        "single_output_throughput": sum(s["tokens"] for s in singles)
        / sum(s["total_s"] for s in singles),
        "single_decode_tok_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "single_runs": singles,
    }


def _hf_generate_batch(args: dict[str, Any]) -> dict[str, Any]:
    import transformers

    model = _load_model(args["model_dir"], args["device"], attn_implementation="sdpa")
    output_len = args["output_len"]
    inputs = _prompt_ids(args, args["batch_requests"])

    def config(new_tokens: int) -> Any:
        # eos_token_id=-1 switches EOS off in the CB manager: every request makes new_tokens.
        return transformers.GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=model.generation_config.pad_token_id,
        )

    model.generate_batch(inputs=[row[:8] for row in inputs[:2]], generation_config=config(2))
    start = time.perf_counter()
    results = model.generate_batch(inputs=inputs, generation_config=config(output_len))
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    errors = [str(r.error) for r in results.values() if r.error is not None]
    return {
        "transformers_version": transformers.__version__,
        "requests": len(inputs),
        "completed": len(results) - len(errors),
        "seconds": elapsed,
        "output_tokens": tokens,
        "output_throughput": tokens / elapsed,
        "errors": errors[:3],
    }


def print_result(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)
