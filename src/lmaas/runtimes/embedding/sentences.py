"""What every sentence-embedding runner shares, whatever runs the encoder.

Validation and tokenisation of requests, padding rows into a batch, pooling and normalisation as
sentence-transformers does, and packing results: the torch and ONNX Runtime runners differ only
in the call that turns ``(input_ids, attention_mask)`` into token embeddings, so both use one
:class:`SentenceEmbedder` and results match ``SentenceTransformer.encode`` either way.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
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
from lmaas.runtimes.embedding.pooling import pool
from lmaas.runtimes.embedding.st_config import SentenceEncoderConfig, read_sentence_encoder_config

IdArray = npt.NDArray[np.int64]


class SentenceEmbedder:
    """Turns requests into padded id batches and encoder outputs into :class:`EmbedResult`.

    Thread-safe: ``prepare`` and ``result`` run on the worker's helper threads while ``pad`` and
    ``pool`` run on its forward thread.

    Args:
        config: Pooling, normalisation and casing from the sentence-transformers files.
        tokenizer: A Hugging Face tokenizer.
        max_length: Longer inputs are truncated (as sentence-transformers does).
        dim: Size of a pooled vector.
        matryoshka_dims: Smaller sizes ``dimensions`` may truncate to.
        vocab_size: Token ids given directly must lie below it.
    """

    def __init__(
        self,
        config: SentenceEncoderConfig,
        tokenizer: Any,
        *,
        max_length: int,
        dim: int,
        matryoshka_dims: list[int],
        vocab_size: int,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = dim
        self.matryoshka_dims = matryoshka_dims
        self.vocab_size = vocab_size
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self._tokenizer_lock = threading.Lock()
        """A fast tokenizer's truncation settings are per object: one caller at a time."""
        self._rust = _truncating_copy(tokenizer, max_length)
        """The fast tokenizer's Rust core with truncation set once (no lock, ~10x less CPU per
        call than ``tokenizer(...)``); None for a slow tokenizer."""

    @classmethod
    def from_spec(
        cls,
        spec: WorkerSpec,
        tokenizer: Any,
        *,
        hidden_size: int,
        max_positions: int | None,
        vocab_size: int | None,
    ) -> SentenceEmbedder:
        """Read the package's sentence-transformers files and the serving options.

        Args:
            spec: The worker spec (``model_dir``; ``options["matryoshka_dims"]``, e.g.
                ``"64,128"``, lists the sizes ``dimensions`` may truncate to).
            tokenizer: The model's tokenizer.
            hidden_size: Size of one token embedding (pooled vectors concatenate one per mode).
            max_positions: The encoder's position limit, when known.
            vocab_size: Rows of the encoder's embedding table (None: the tokenizer's size).

        Raises:
            ModelLoadError: unreadable or unsupported configuration.
        """
        config = read_sentence_encoder_config(Path(spec.model_dir))
        dim = hidden_size * len(config.pooling_modes)
        return cls(
            config,
            tokenizer,
            max_length=_max_length(config, tokenizer, max_positions),
            dim=dim,
            matryoshka_dims=_matryoshka_dims(spec.options, dim),
            vocab_size=vocab_size or len(tokenizer),
        )

    def model_info(self, *, dtype: str, device: str, max_batch_size: int) -> ModelInfo:
        return ModelInfo(
            context_length=self.max_length,
            dtype=dtype,
            device=device,
            embedding_dim=self.dim,
            matryoshka_dims=self.matryoshka_dims or None,
            max_input_tokens=self.max_length,
            inputs=[TensorSpec("text", "BYTES", [-1])],
            outputs=[TensorSpec("embedding", "FP32", [-1, self.dim])],
            max_batch_size=max_batch_size,
        )

    # ------------------------------------------------------------------ helper threads

    def prepare(self, request: EmbedRequest) -> Prepared:
        """Validate and tokenise; one row per input. Raises: InvalidRequestError."""
        dims = request.dimensions
        if dims is not None and dims != self.dim and dims not in self.matryoshka_dims:
            allowed = sorted({*self.matryoshka_dims, self.dim})
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
        return Prepared(request.request_id, [(len(ids), ids) for ids in inputs], request)

    def result(self, prepared: Prepared) -> EmbedResult:
        """Pack the pooled rows of one request (truncated to ``dimensions`` if asked)."""
        request: EmbedRequest = prepared.context
        matrix = torch.stack(prepared.outputs)
        dims = request.dimensions
        if dims is not None and dims < matrix.shape[1]:
            matrix = matrix[:, :dims]
            if self.config.normalize:
                matrix = torch.nn.functional.normalize(matrix, p=2, dim=-1)
        data = matrix.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
        return EmbedResult(
            request_id=prepared.request_id,
            data=data,
            num_inputs=matrix.shape[0],
            dim=matrix.shape[1],
            prompt_tokens=sum(length for length, _ in prepared.rows),
        )

    # ------------------------------------------------------------------ forward thread

    def pad(self, batch: list[list[int]]) -> tuple[IdArray, IdArray]:
        """``(input_ids, attention_mask)``, right-padded to the longest row, int64."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool token embeddings ``[batch, seq, hidden]`` and normalise if the package does."""
        return self.normalize(pool(hidden.float(), mask, self.config.pooling_modes))

    def normalize(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.config.normalize:
            return torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    # ------------------------------------------------------------------ internals

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            raise InvalidRequestError("input must not be empty", param="input")
        if any(not text for text in texts):
            raise InvalidRequestError("input must not contain empty strings", param="input")
        # sentence-transformers strips (and optionally lower-cases) before tokenising.
        cleaned = [t.strip().lower() if self.config.do_lower_case else t.strip() for t in texts]
        if self._rust is not None:
            return [encoding.ids for encoding in self._rust.encode_batch(cleaned)]
        with self._tokenizer_lock:
            encoded = self.tokenizer(cleaned, truncation=True, max_length=self.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def _check_ids(self, token_ids: list[list[int]]) -> list[list[int]]:
        if not token_ids or any(not ids for ids in token_ids):
            raise InvalidRequestError("input must not be empty", param="input")
        for ids in token_ids:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                    param="input",
                )
        return [ids[: self.max_length] for ids in token_ids]


def _truncating_copy(tokenizer: Any, max_length: int) -> Any:
    """A copy of a fast tokenizer's ``tokenizers.Tokenizer`` that truncates to ``max_length``
    and never pads (what ``tokenizer(texts, truncation=True, max_length=...)`` does for single
    texts), or None when the tokenizer has no Rust core."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length)
    return copy


def _max_length(config: SentenceEncoderConfig, tokenizer: Any, max_positions: int | None) -> int:
    limits = [max_positions or 0]
    if config.max_seq_length is not None:
        limits.append(config.max_seq_length)
    else:
        limits.append(int(getattr(tokenizer, "model_max_length", 0) or 0))
    positive = [limit for limit in limits if 0 < limit < 1_000_000]
    if not positive:
        raise ModelLoadError("cannot tell the encoder's maximum input length")
    return min(positive)


def _matryoshka_dims(options: Mapping[str, str], dim: int) -> list[int]:
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


class SentenceRunnerBase:
    """The BatchRunner methods every embedding backend shares: requests in and results out go
    through one :class:`SentenceEmbedder`; a backend adds ``load``, ``health`` and ``forward``."""

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._sentences: SentenceEmbedder | None = None

    @property
    def sentences(self) -> SentenceEmbedder:
        if self._sentences is None:
            raise InternalError("the model is not loaded")
        return self._sentences

    def warmup(self) -> None:
        """Embed one short text."""
        self.embed([EmbedRequest(request_id="__lmaas_warmup__", texts=["Hello world"])])

    def accepts(self) -> tuple[type, ...]:
        return (EmbedRequest,)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult | RequestError]:
        """Embed requests in-process (warm-up, benchmarks, tests); the worker batches instead."""
        results = run_batch(self, requests, self._spec.max_batch_size)  # type: ignore[arg-type]
        return [r for r in results if isinstance(r, EmbedResult | RequestError)]

    def preprocess(self, request: InferRequest) -> Prepared:
        """Validate and tokenise; one row per input. Raises: InvalidRequestError."""
        if not isinstance(request, EmbedRequest):
            raise InvalidRequestError("this model only embeds text")
        return self.sentences.prepare(request)

    def postprocess(self, prepared: Prepared) -> EmbedResult:
        return self.sentences.result(prepared)
