"""Read what a model says about itself: task, architecture, dtype, context length, labels.

Only JSON files are read (``config.json``, ``tokenizer_config.json``, ``modules.json``,
``sentence_bert_config.json``, ``config_sentence_transformers.json``); torch and transformers are
never imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.core.errors import InvalidRequestError
from lmaas.core.types import Task

SEQ2SEQ_MODEL_TYPES = frozenset(
    {"t5", "mt5", "umt5", "bart", "mbart", "marian", "pegasus", "m2m_100", "nllb", "fsmt", "led"}
)
"""``model_type`` values of text-to-text encoder-decoders."""

_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the import learned from a model's own config files."""

    task: Task
    architecture: str | None = None
    dtype: str | None = None
    context_length: int | None = None
    labels: list[str] | None = None


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object file; a missing file reads as ``{}``.

    Raises:
        InvalidRequestError: The file is not a JSON object.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{path.name} must hold a JSON object")
    return data


def has_chat_template(model_dir: Path) -> bool:
    """True when the tokenizer ships a chat template (in its config or as a separate file)."""
    if any((model_dir / name).is_file() for name in _CHAT_TEMPLATE_FILES):
        return True
    template = read_json(model_dir / "tokenizer_config.json").get("chat_template")
    return bool(template)


def _architecture(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def _num_labels(config: dict[str, Any]) -> int | None:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    num = config.get("num_labels")
    return num if isinstance(num, int) else None


def _task_from_architecture(arch: str, config: dict[str, Any], model_dir: Path) -> Task | None:
    model_type = str(config.get("model_type", "")).lower()
    if arch.endswith(("ForSpeechSeq2Seq", "ForCTC")) or arch == "WhisperForConditionalGeneration":
        return Task.SPEECH_TO_TEXT
    if arch.endswith(("ForConditionalGeneration", "WithLMHeadModel", "MTModel")):
        if config.get("is_encoder_decoder") or model_type in SEQ2SEQ_MODEL_TYPES:
            return Task.SEQ2SEQ
        return None
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return Task.CHAT if has_chat_template(model_dir) else Task.COMPLETION
    if arch.endswith("ForSequenceClassification"):
        # A one-output cross-encoder scores (query, document) pairs: a reranker.
        return Task.RERANK if _num_labels(config) == 1 else Task.CLASSIFICATION
    if arch.endswith("ForImageClassification"):
        return Task.IMAGE_CLASSIFICATION
    if arch.endswith("Model"):
        return Task.EMBEDDING
    return None


def _is_cross_encoder(model_dir: Path) -> bool:
    """sentence-transformers 5+ saves CrossEncoders with a ``modules.json`` too."""
    st_config = read_json(model_dir / "config_sentence_transformers.json")
    return st_config.get("model_type") == "CrossEncoder"


def infer_task(model_dir: Path, config: dict[str, Any]) -> Task:
    """Infer the task of an HF-layout directory.

    Raises:
        InvalidRequestError: The layout does not say; the message asks for ``--task``.
    """
    if (model_dir / "modules.json").is_file() and not _is_cross_encoder(model_dir):
        return Task.EMBEDDING
    arch = _architecture(config)
    task = _task_from_architecture(arch, config, model_dir) if arch else None
    if task is None and "alignment_heads" in config:
        task = Task.SPEECH_TO_TEXT  # CTranslate2 Whisper conversions keep these in config.json
    if task is None:
        choices = ", ".join(t.value for t in Task)
        what = f"architecture {arch!r}" if arch else "a config without 'architectures'"
        raise InvalidRequestError(
            f"cannot infer the task of {model_dir.name!r} from {what}; "
            f"pass --task (one of: {choices})",
            param="task",
        )
    return task


def _context_length(model_dir: Path, config: dict[str, Any]) -> int | None:
    found: int | None = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            found = value
            break
    st_config = read_json(model_dir / "sentence_bert_config.json")
    st_value = st_config.get("max_seq_length")
    if isinstance(st_value, int) and st_value > 0:
        found = st_value if found is None else min(found, st_value)
    return found


def _labels(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        ordered = sorted(id2label.items(), key=lambda item: int(item[0]))
    except (TypeError, ValueError):
        return None
    return [str(label) for _, label in ordered]


def _dtype(config: dict[str, Any]) -> str | None:
    value = config.get("torch_dtype", config.get("dtype"))
    return value if isinstance(value, str) else None


def inspect_model_dir(model_dir: Path, task: Task | None = None) -> ModelFacts:
    """Read the facts of an HF-layout (or CTranslate2) directory.

    Args:
        model_dir: The directory holding ``config.json``.
        task: The task named by the user; inferred when None.

    Raises:
        InvalidRequestError: Unreadable config, or the task cannot be inferred.
    """
    config = read_json(model_dir / "config.json")
    if task is None:
        task = infer_task(model_dir, config)
    labels = _labels(config) if task in (Task.CLASSIFICATION, Task.IMAGE_CLASSIFICATION) else None
    return ModelFacts(
        task=task,
        architecture=_architecture(config),
        dtype=_dtype(config),
        context_length=_context_length(model_dir, config),
        labels=labels,
    )
