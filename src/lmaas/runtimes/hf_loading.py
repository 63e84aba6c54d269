"""Loading Hugging Face checkpoints the one safe way every torch runner shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.int8_weights import load_int8, wants_int8


def load_hf_model(spec: WorkerSpec, auto_class: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from ``spec.model_dir`` with ``transformers.<auto_class>``.

    Safetensors only and local files only; custom model code runs only when the import recorded
    ``--trust-remote-code`` (``spec.options["trust_remote_code"] == "true"``).

    Raises:
        ModelLoadError: the directory is missing or transformers cannot load it.
    """
    import transformers

    # Per-shard progress bars mean nothing in a server log.
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model_dir = Path(spec.model_dir)
    trust = spec.options.get("trust_remote_code") == "true"
    tokenizer = load_hf_tokenizer(spec)
    if wants_int8(spec.options, model_dir):  # ``lmaas compress --int8`` versions
        return load_int8(model_dir, auto_class, trust), tokenizer
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            str(model_dir),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust,
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelLoadError(f"cannot load {model_dir} as {auto_class}: {exc}") from exc
    return model, tokenizer


def load_hf_tokenizer(spec: WorkerSpec) -> Any:
    """The tokenizer in ``spec.model_dir`` (local files only; custom code as for models).

    Raises:
        ModelLoadError: the directory is missing or has no loadable tokenizer.
    """
    import transformers

    model_dir = Path(spec.model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    trust = spec.options.get("trust_remote_code") == "true"
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=trust
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc
