"""Sentence embeddings from a sentence-transformers style encoder on torch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InternalError
from lmaas.core.messages import (
    ModelInfo,
    WorkerSpec,
)
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.embedding.sentences import SentenceEmbedder, SentenceRunnerBase
from lmaas.runtimes.hf_loading import load_hf_model
from lmaas.runtimes.packed import PackedEncoder, packed_option

_log = logging.getLogger(__name__)


class TorchEmbeddingRunner(SentenceRunnerBase):
    """Embeds texts (or token id lists) with a sentence-transformers package on torch.

    Implements :class:`lmaas.runtimes.base.BatchRunner`: each input text is one row, so the
    worker's dynamic batcher merges inputs of many requests into one forward pass, grouped by
    length. Tokenisation, pooling, normalisation and the maximum length are the
    :class:`~lmaas.runtimes.embedding.sentences.SentenceEmbedder`'s (shared with the ONNX Runtime
    runner), so results match ``SentenceTransformer.encode``. On a CPU, ``dtype=auto`` stays in
    float32. Encoders of the families in :data:`lmaas.runtimes.packed.PACKED_FAMILIES` run on
    packed rows (no padding in the linear layers; option ``packed: "false"`` turns it off).

    Args:
        spec: The worker spec; ``options["matryoshka_dims"]`` (e.g. ``"64,128"``) lists the
            sizes ``dimensions`` may truncate to.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._model: Any = None
        self._packed: PackedEncoder | None = None
        self._device = torch.device("cpu")

    def load(self) -> ModelInfo:
        """Load tokenizer, encoder and pooling config. Raises: ModelLoadError."""
        self._device = resolve_device(self._spec.device)
        dtype = resolve_dtype(self._spec.dtype, self._device, prefer_float32_on_cpu=True)
        configure_threads(num_threads_option(self._spec.options))
        self._model, tokenizer = load_hf_model(self._spec, "AutoModel", dtype)
        self._model.to(self._device)
        self._model.eval()
        if packed_option(self._spec.options) and PackedEncoder.supports(self._model):
            self._packed = PackedEncoder(self._model)
        config = self._model.config
        self._sentences = SentenceEmbedder.from_spec(
            self._spec,
            tokenizer,
            hidden_size=int(config.hidden_size),
            max_positions=getattr(config, "max_position_embeddings", None),
            vocab_size=int(config.vocab_size),
        )
        _log.info(
            "loaded %s on %s (%s, %s rows)",
            Path(self._spec.model_dir),
            self._device,
            dtype_name(dtype),
            "packed" if self._packed is not None else "padded",
        )
        return self._sentences.model_info(
            dtype=dtype_name(dtype),
            device=str(self._device),
            max_batch_size=self._spec.max_batch_size,
        )

    def health(self) -> bool:
        return self._model is not None

    @torch.inference_mode()
    def forward(self, payloads: list[list[int]]) -> list[torch.Tensor]:
        if self._model is None:
            raise InternalError("the model is not loaded")
        if self._packed is not None:
            tokens, packing = self._packed.hidden(payloads)
            rows = self.sentences.pool(packing.unpack(tokens), packing.mask())
            return list(rows.cpu())
        ids, mask = self.sentences.pad(payloads)
        input_ids = torch.from_numpy(ids).to(self._device)
        attention_mask = torch.from_numpy(mask).to(self._device)
        hidden = self._model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return list(self.sentences.pool(hidden, attention_mask).cpu())
