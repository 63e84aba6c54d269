"""Perplexity of a causal LM on text, with the weights loaded the way its runner loads them.

Serving has no route for prompt log-likelihoods, so this one metric uses the model directly:
the same :func:`~lmaas.runtimes.hf_loading.load_hf_model`, device and dtype as
:class:`~lmaas.runtimes.llm.torch.TorchCausalLMRunner`. Each text is tokenized (with the
tokenizer's special tokens) and cut into non-overlapping windows of the context length; every
token but the first of a window is predicted from the ones before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import WorkerSpec
from lmaas.lifecycle import metrics as m
from lmaas.runtimes.device import resolve_device, resolve_dtype
from lmaas.runtimes.hf_loading import load_hf_model

DEFAULT_WINDOW_TOKENS = 1024
"""Window when neither the spec nor the model config gives a context length."""


def causal_lm_perplexity(
    spec: WorkerSpec, texts: list[str], progress: Callable[[int], None]
) -> dict[str, float]:
    """``perplexity``, ``nll_per_token`` and ``num_tokens`` (tokens predicted) over ``texts``.

    Raises:
        InvalidRequestError: The texts hold fewer than two tokens in total.
    """
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model, tokenizer = load_hf_model(spec, "AutoModelForCausalLM", dtype)
    model.to(device)
    model.eval()
    window = spec.context_length or getattr(model.config, "max_position_embeddings", None)
    window = max(2, int(window or DEFAULT_WINDOW_TOKENS))
    total_nll, num_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=True)
            for start in range(0, len(ids), window):
                chunk = ids[start : start + window]
                if len(chunk) < 2:
                    continue
                input_ids = torch.tensor([chunk], device=device)
                logits = model(input_ids=input_ids).logits[0, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum")
                total_nll += float(nll)
                num_tokens += len(chunk) - 1
            progress(1)
    if num_tokens == 0:
        raise InvalidRequestError("the text is too short for perplexity (under two tokens)")
    return {
        "perplexity": m.perplexity(total_nll, num_tokens),
        "nll_per_token": total_nll / num_tokens,
        "num_tokens": float(num_tokens),
    }
