"""Reading a sentence-transformers package: pooling, normalisation, maximum length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.core.errors import ModelLoadError

# The order sentence-transformers concatenates pooled vectors in when several modes are on.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")
_ST_PACKAGE = "sentence_transformers."
_SUPPORTED_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})


@dataclass(slots=True, frozen=True)
class SentenceEncoderConfig:
    """How to turn token embeddings into one sentence vector."""

    pooling_modes: tuple[str, ...]
    """Subset of :data:`POOLING_MODES`, in that order."""
    normalize: bool
    max_seq_length: int | None
    """None: the tokenizer's / model's own limit."""
    do_lower_case: bool


def read_sentence_encoder_config(model_dir: Path) -> SentenceEncoderConfig:
    """Read ``modules.json``, ``1_Pooling/config.json`` and ``sentence_bert_config.json``.

    Missing files mean a plain HF encoder: mean pooling, no normalisation. A ``Normalize``
    module needs no directory of its own (all-MiniLM-L6-v2 ships without one).

    Raises:
        ModelLoadError: unreadable JSON, or a module or pooling mode this runtime cannot apply.
    """
    modules = [m for m in _read_json(model_dir / "modules.json") or [] if isinstance(m, dict)]
    types = [str(m.get("type", "")) for m in modules]
    classes = [_module_class(t) for t in types]
    unsupported = [t for t, c in zip(types, classes, strict=True) if c not in _SUPPORTED_MODULES]
    if unsupported:
        raise ModelLoadError(
            f"sentence-transformers module(s) {', '.join(unsupported)} are not supported; "
            f"supported: {', '.join(sorted(_SUPPORTED_MODULES))}"
        )
    pooling_dir = next(
        (str(m.get("path", "")) for m, c in zip(modules, classes, strict=True) if c == "Pooling"),
        "1_Pooling",
    )
    pooling = _read_json(model_dir / pooling_dir / "config.json") or {}
    modes = tuple(m for m in POOLING_MODES if pooling.get(f"pooling_mode_{m}"))
    if pooling.get("pooling_mode_weightedmean_tokens"):
        raise ModelLoadError("weighted-mean pooling is not supported")
    bert = _read_json(model_dir / "sentence_bert_config.json") or {}
    max_seq_length = bert.get("max_seq_length")
    return SentenceEncoderConfig(
        pooling_modes=modes or ("mean_tokens",),
        normalize="Normalize" in classes,
        max_seq_length=int(max_seq_length) if max_seq_length is not None else None,
        do_lower_case=bool(bert.get("do_lower_case", False)),
    )


def _module_class(type_name: str) -> str | None:
    """``Pooling`` for ``sentence_transformers.models.Pooling`` (sentence-transformers < 6) and
    for ``sentence_transformers.sentence_transformer.modules.pooling.Pooling`` (6+, which moved
    its modules); None for a module from another package."""
    if not type_name.startswith(_ST_PACKAGE):
        return None
    return type_name.rsplit(".", 1)[-1]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
