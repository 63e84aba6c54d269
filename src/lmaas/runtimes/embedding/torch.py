"""Sentence embeddings from a sentence-transformers style encoder on torch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InternalError, InvalidRequestError, ModelLoadError
from lmaas.core.messages import (
    EmbedRequest,
    EmbedResult,
    InferRequest,
    ModelInfo,
    RequestError,
    TensorSpec,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.embedding.pooling import pool
from lmaas.runtimes.embedding.st_config import SentenceEncoderConfig, read_sentence_encoder_config
from lmaas.runtimes.hf_loading import load_hf_model

_log = logging.getLogger(__name__)


class TorchEmbeddingRunner:
    """Embeds texts (or token id lists) with a sentence-transformers package on torch.

    Implements :class:`lmaas.runtimes.base.BatchRunner`: each input text is one row, so the
    worker's dynamic batcher merges inputs of many requests into one forward pass, grouped by
    length. The pooling, normalisation and maximum length come from the package's own files, so
    results match ``SentenceTransformer.encode``. Inputs longer than the maximum length are
    truncated, as sentence-transformers does, and ``prompt_tokens`` counts what was actually
    encoded. On a CPU, ``dtype=auto`` stays in float32.

    Args:
        spec: The worker spec; ``options["matryoshka_dims"]`` (e.g. ``"64,128"``) lists the
            sizes ``dimensions`` may truncate to.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._model: Any = None
        self._tokenizer: Any = None
        self._config = SentenceEncoderConfig(("mean_tokens",), False, None, False)
        self._device = torch.device("cpu")
        self._max_length = 0
        self._dim = 0
        self._matryoshka_dims: list[int] = []
        self._vocab_size = 0
        self._pad_id = 0
        self._tokenizer_lock = threading.Lock()
        """A fast tokenizer's truncation settings are per object: one caller at a time."""

    def load(self) -> ModelInfo:
        """Load tokenizer, encoder and pooling config. Raises: ModelLoadError."""
        model_dir = Path(self._spec.model_dir)
        self._device = resolve_device(self._spec.device)
        dtype = resolve_dtype(self._spec.dtype, self._device, prefer_float32_on_cpu=True)
        configure_threads(num_threads_option(self._spec.options))
        self._config = read_sentence_encoder_config(model_dir)
        self._model, self._tokenizer = load_hf_model(self._spec, "AutoModel", dtype)
        self._model.to(self._device)
        self._model.eval()
        config = self._model.config
        self._vocab_size = int(config.vocab_size)
        self._pad_id = int(self._tokenizer.pad_token_id or 0)
        self._max_length = _max_length(self._config, self._tokenizer, config)
        self._dim = int(config.hidden_size) * len(self._config.pooling_modes)
        self._matryoshka_dims = _matryoshka_dims(self._spec.options, self._dim)
        _log.info("loaded %s on %s (%s)", model_dir, self._device, dtype)
        return ModelInfo(
            context_length=self._max_length,
            dtype=dtype_name(dtype),
            device=str(self._device),
            embedding_dim=self._dim,
            matryoshka_dims=self._matryoshka_dims or None,
            max_input_tokens=self._max_length,
            inputs=[TensorSpec("text", "BYTES", [-1])],
            outputs=[TensorSpec("embedding", "FP32", [-1, self._dim])],
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Embed one short text."""
        self.embed([EmbedRequest(request_id="__lmaas_warmup__", texts=["Hello world"])])

    def health(self) -> bool:
        return self._model is not None

    def accepts(self) -> tuple[type, ...]:
        return (EmbedRequest,)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult | RequestError]:
        """Embed requests in-process (warm-up, benchmarks, tests); the worker batches instead."""
        results = run_batch(self, requests, self._spec.max_batch_size)
        return [r for r in results if isinstance(r, EmbedResult | RequestError)]

    def preprocess(self, request: InferRequest) -> Prepared:
        """Validate and tokenise; one row per input. Raises: InvalidRequestError."""
        if not isinstance(request, EmbedRequest):
            raise InvalidRequestError("this model only embeds text")
        inputs = self._prepare(request)
        return Prepared(request.request_id, [(len(ids), ids) for ids in inputs], request)

    @torch.inference_mode()
    def forward(self, payloads: list[list[int]]) -> list[torch.Tensor]:
        if self._model is None:
            raise InternalError("the model is not loaded")
        return list(self._encode(payloads))

    def postprocess(self, prepared: Prepared) -> EmbedResult:
        request: EmbedRequest = prepared.context
        matrix = torch.stack(prepared.outputs)
        dims = request.dimensions
        if dims is not None and dims < matrix.shape[1]:
            matrix = matrix[:, :dims]
            if self._config.normalize:
                matrix = torch.nn.functional.normalize(matrix, p=2, dim=-1)
        data = matrix.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
        return EmbedResult(
            request_id=prepared.request_id,
            data=data,
            num_inputs=matrix.shape[0],
            dim=matrix.shape[1],
            prompt_tokens=sum(length for length, _ in prepared.rows),
        )

    # ------------------------------------------------------------------ helpers

    def _prepare(self, request: EmbedRequest) -> list[list[int]]:
        dims = request.dimensions
        if dims is not None and dims != self._dim and dims not in self._matryoshka_dims:
            allowed = sorted({*self._matryoshka_dims, self._dim})
            raise InvalidRequestError(
                f"dimensions={dims} is not supported by this model; "
                f"allowed: {', '.join(map(str, allowed))}",
                param="dimensions",
            )
        if request.texts is not None and request.token_ids is None:
            inputs = self._tokenize(request.texts)
        elif request.token_ids is not None and request.texts is None:
            inputs = self._check_ids(request.token_ids)
        else:
            raise InvalidRequestError("give either texts or token ids", param="input")
        return inputs

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            raise InvalidRequestError("input must not be empty", param="input")
        if any(not text for text in texts):
            raise InvalidRequestError("input must not contain empty strings", param="input")
        # sentence-transformers strips (and optionally lower-cases) before tokenising.
        cleaned = [t.strip().lower() if self._config.do_lower_case else t.strip() for t in texts]
        with self._tokenizer_lock:
            encoded = self._tokenizer(cleaned, truncation=True, max_length=self._max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def _check_ids(self, token_ids: list[list[int]]) -> list[list[int]]:
        if not token_ids or any(not ids for ids in token_ids):
            raise InvalidRequestError("input must not be empty", param="input")
        for ids in token_ids:
            bad = [i for i in ids if not 0 <= i < self._vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the vocabulary [0, {self._vocab_size})",
                    param="input",
                )
        return [ids[: self._max_length] for ids in token_ids]

    def _encode(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self._device), mask.to(self._device)
        hidden = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden.float(), mask, self._config.pooling_modes)
        if self._config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu()


def _max_length(config: SentenceEncoderConfig, tokenizer: Any, model_config: Any) -> int:
    limits = [int(getattr(model_config, "max_position_embeddings", 0) or 0)]
    if config.max_seq_length is not None:
        limits.append(config.max_seq_length)
    else:
        limits.append(int(getattr(tokenizer, "model_max_length", 0) or 0))
    positive = [limit for limit in limits if 0 < limit < 1_000_000]
    if not positive:
        raise ModelLoadError("cannot tell the encoder's maximum input length")
    return min(positive)


def _matryoshka_dims(options: dict[str, str], dim: int) -> list[int]:
    raw = options.get("matryoshka_dims", "").strip()
    if not raw:
        return []
    try:
        dims = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError as exc:
        raise ModelLoadError(f"matryoshka_dims={raw!r} is not a list of integers") from exc
    if any(not 0 < d <= dim for d in dims):
        raise ModelLoadError(f"matryoshka_dims={raw!r} must lie in 1..{dim}")
    return dims
