"""A Hugging Face sequence-classification model on torch, shared by the rerank and classify runners.

Both tasks run the same network (``AutoModelForSequenceClassification``): a classifier tokenises
one text per row, a cross-encoder one (query, document) pair per row. This module loads the model,
tokenises into rows of token ids, runs batches (packed rows for the families of
:mod:`lmaas.runtimes.packed`, else right-padded) and returns each row's logits; the runners turn
logits into scores or probabilities.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InternalError, InvalidRequestError, ModelLoadError
from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.hf_loading import load_hf_model
from lmaas.runtimes.int8_weights import wants_int8
from lmaas.runtimes.packed import PackedEncoder, classification_head, packed_option

_log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class EncodedRow:
    """One tokenised row: ids, and segment ids for models that use them (BERT pairs)."""

    input_ids: list[int]
    token_type_ids: list[int] | None


class SequenceClassifier:
    """Tokenise texts or text pairs and compute classification logits in padded batches.

    Tokenisation is thread-safe (the worker preprocesses on helper threads; a fast tokenizer's
    truncation settings are per object, so one caller at a time holds it). ``logits`` runs on
    the worker's model thread only.

    Args:
        spec: The worker spec (model directory, device, dtype, ``num_threads`` option).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._model: Any = None
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._device = torch.device("cpu")
        self._pad_id = 0
        self._uses_token_types = False
        self._packed: tuple[PackedEncoder, Callable[[torch.Tensor], torch.Tensor]] | None = None
        """The encoder on packed rows and the head over each row's first token, for the
        families :mod:`lmaas.runtimes.packed` knows (option ``packed: "false"``: padded)."""
        self.max_length = 0
        """Longest row in tokens (special tokens included); longer inputs are truncated."""
        self.dtype = "float32"
        self.labels: list[str] = []
        """Class names in logit order (``id2label``; ``LABEL_i`` where the config has none)."""
        self.config: Any = None
        """The model's ``PretrainedConfig``."""

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load tokenizer and model. Raises: ModelLoadError."""
        int8 = wants_int8(self._spec.options, Path(self._spec.model_dir))
        # torch's int8 Linear kernels run on the CPU only.
        self._device = torch.device("cpu") if int8 else resolve_device(self._spec.device)
        dtype = resolve_dtype(self._spec.dtype, self._device, prefer_float32_on_cpu=True)
        configure_threads(num_threads_option(self._spec.options))
        model, tokenizer = load_hf_model(self._spec, "AutoModelForSequenceClassification", dtype)
        self._model = model.to(self._device).eval()
        self.dtype = "int8" if int8 else dtype_name(dtype)
        self._set_tokenizer(tokenizer, model.config, uses_token_types=None)
        head = classification_head(model)
        packable = head is not None and PackedEncoder.supports(model.base_model)
        if packed_option(self._spec.options) and head is not None and packable:
            self._packed = (PackedEncoder(model.base_model), head)
        _log.info(
            "loaded %s on %s (%s, %s rows)",
            self._spec.model_dir,
            self._device,
            self.dtype,
            "packed" if self._packed is not None else "padded",
        )

    def _set_tokenizer(self, tokenizer: Any, config: Any, *, uses_token_types: bool | None) -> None:
        """Remember the tokenizer and what the config says (labels, lengths, segment ids).

        ``uses_token_types`` None: decided from the tokenizer and ``type_vocab_size`` (BERT
        pairs); a graph states it by its inputs instead.
        """
        self._tokenizer, self.config = tokenizer, config
        self._pad_id = int(tokenizer.pad_token_id or 0)
        if uses_token_types is None:
            uses_token_types = (
                "token_type_ids" in getattr(tokenizer, "model_input_names", ())
                and int(getattr(config, "type_vocab_size", 0) or 0) > 1
            )
        self._uses_token_types = uses_token_types
        self.max_length = _max_length(Path(self._spec.model_dir), tokenizer, config)
        self.labels = _labels(config)

    def encode_texts(self, texts: list[str]) -> list[EncodedRow]:
        """One row per text, truncated to :attr:`max_length`."""
        with self._tokenizer_lock:
            encoded = self._tokenizer(texts, truncation=True, max_length=self.max_length)
        return self._rows(encoded)

    def encode_pairs(self, first: str, seconds: list[str]) -> list[EncodedRow]:
        """One row per ``(first, second)`` pair, truncated longest-first to :attr:`max_length`
        (what sentence-transformers' ``CrossEncoder`` does)."""
        with self._tokenizer_lock:
            encoded = self._tokenizer(
                [first] * len(seconds),
                seconds,
                truncation="longest_first",
                max_length=self.max_length,
            )
        return self._rows(encoded)

    def _rows(self, encoded: Any) -> list[EncodedRow]:
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids") if self._uses_token_types else None
        return [
            EncodedRow(list(row), list(types[i]) if types is not None else None)
            for i, row in enumerate(ids)
        ]

    @torch.inference_mode()
    def logits(self, rows: list[EncodedRow]) -> list[torch.Tensor]:
        """Float32 logits ``[num_labels]`` per row, on the CPU."""
        if self._model is None:
            raise InternalError("the model is not loaded")
        if self._packed is not None:
            encoder, head = self._packed
            types = [r.token_type_ids or [0] * len(r.input_ids) for r in rows]
            tokens, packing = encoder.hidden([r.input_ids for r in rows], types)
            return list(head(packing.firsts(tokens)).float().cpu())
        inputs = {name: tensor.to(self._device) for name, tensor in self.padded(rows).items()}
        logits = self._model(**inputs).logits.float().cpu()
        return list(logits)

    def padded(self, rows: list[EncodedRow]) -> dict[str, torch.Tensor]:
        """The model's inputs for ``rows``: right-padded ids, mask (and segment ids), int64."""
        width = max(len(row.input_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            input_ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
            mask[i, :n] = 1
            if row.token_type_ids is not None:
                types[i, :n] = torch.tensor(row.token_type_ids, dtype=torch.long)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self._uses_token_types:
            inputs["token_type_ids"] = types
        return inputs


def check_texts(texts: list[str], param: str) -> None:
    """Refuse an empty list and empty strings: a clear 400 instead of a meaningless score.

    Raises:
        InvalidRequestError: naming ``param`` (with the index of the first empty string).
    """
    if not texts:
        raise InvalidRequestError(f"'{param}' must not be empty", param=param)
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequestError(
                f"'{param}[{i}]' is empty; give non-empty strings", param=f"{param}[{i}]"
            )


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of the model directory; missing reads as ``{}``.

    Raises:
        ModelLoadError: unreadable, or not a JSON object.
    """
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path.name} must hold a JSON object")
    return value


def _max_length(model_dir: Path, tokenizer: Any, config: Any) -> int:
    limits = [
        int(getattr(tokenizer, "model_max_length", 0) or 0),
        int(getattr(config, "max_position_embeddings", 0) or 0),
    ]
    st_max = read_json_object(model_dir / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(st_max, int):
        limits.append(st_max)
    positive = [limit for limit in limits if 0 < limit < 1_000_000]
    if not positive:
        raise ModelLoadError("cannot tell the model's maximum input length")
    return min(positive)


def _labels(config: Any) -> list[str]:
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    id2label = getattr(config, "id2label", None) or {}
    names = {int(key): str(value) for key, value in dict(id2label).items()}
    if num_labels < 1:
        raise ModelLoadError("the model's config has no labels (num_labels < 1)")
    return [names.get(i, f"LABEL_{i}") for i in range(num_labels)]
