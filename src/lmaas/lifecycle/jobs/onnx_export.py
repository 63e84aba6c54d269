"""What ``lmaas convert --onnx`` adds to the runtime's exporters
(:mod:`lmaas.runtimes.onnx_export`, the same graphs a worker exports for
``serving.backend: onnxruntime``): parity samples and checks, and the compaction of a graph
before it is stored as a version.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmaas.core.errors import InvalidRequestError
from lmaas.runtimes.onnx_export import input_names
from lmaas.runtimes.onnx_session import open_session

PARITY_MAX_TOKENS = 128
"""Sample rows are truncated to this many tokens (parity needs variety, not length)."""
_CHUNK = 32


_EXTERNAL_DATA_BYTES = 1 << 30
"""Graphs with more weight bytes keep them in a side file (protobuf's 2 GiB limit)."""


def compact_graph(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source stack traces, module paths).

    They take more room than the weights of a small model and nothing reads them at serving
    time. The graph is rewritten in place: one file, or ``<name>.data`` beside it for weights
    over 1 GiB (the exporter's own external-data file is replaced).
    """
    import onnx

    header = onnx.load(str(path), load_external_data=False)
    external = {
        entry.value
        for init in header.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    weight_bytes = sum(len(init.raw_data) for init in model.graph.initializer)
    for name in external:
        (path.parent / name).unlink(missing_ok=True)
    big = weight_bytes > _EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, location=f"{path.name}.data")


def random_texts(tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """``count`` texts of 2-40 random whole words of the tokenizer's vocabulary (seeded)."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 1)
    if not words:
        raise InvalidRequestError("the tokenizer has no whole words to build samples from")
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(2, 40))) for _ in range(count)]


def sample_batches(
    model: Any, tokenizer: Any, texts: list[str], pairs_with: list[str] | None, segments: bool
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, right-padded batches of ``texts`` (or ``(text, pairs_with[i])`` pairs), each
    row at most :data:`PARITY_MAX_TOKENS` tokens or the model's own limit if lower."""
    names = input_names(segments)
    limits = [
        PARITY_MAX_TOKENS,
        int(getattr(tokenizer, "model_max_length", 0) or 0),
        int(getattr(model.config, "max_position_embeddings", 0) or 0),
    ]
    max_length = min(limit for limit in limits if limit > 0)
    batches = []
    for start in range(0, len(texts), _CHUNK):
        first = texts[start : start + _CHUNK]
        second = pairs_with[start : start + _CHUNK] if pairs_with is not None else None
        encoded = tokenizer(
            first, second, padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )  # fmt: skip
        if segments and "token_type_ids" not in encoded:
            encoded["token_type_ids"] = torch.zeros_like(encoded["input_ids"])
        batches.append({n: encoded[n].to(torch.long) for n in names})
    return batches


def text_parity(
    model: Any, graph: Path, batches: list[dict[str, torch.Tensor]]
) -> tuple[float, float]:
    """``(max abs logit difference, top-1 agreement)`` of torch and ONNX Runtime.

    For one-logit models (cross-encoders) "top-1" is the sign of the logit: the side of the
    sigmoid's 0.5 the score falls on.
    """
    session = open_session(graph, 1)
    diffs, agree, total = [], 0, 0
    for feeds in batches:
        with torch.no_grad():
            expected = model(**feeds).logits.float().numpy()
        (actual,) = session.run(None, {n: t.numpy() for n, t in feeds.items()})
        diffs.append(float(np.abs(expected - actual).max()))
        if expected.shape[1] == 1:
            agree += int(((expected[:, 0] > 0) == (actual[:, 0] > 0)).sum())
        else:
            agree += int((expected.argmax(axis=1) == actual.argmax(axis=1)).sum())
        total += expected.shape[0]
    return max(diffs), agree / max(1, total)
