"""Cross-encoder reranking on torch: one relevance score per (query, document) pair."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import (
    InferRequest,
    ModelInfo,
    RequestError,
    RerankRequest,
    ScoreResult,
    TensorSpec,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.classification.sequence import (
    EncodedRow,
    SequenceClassifier,
    check_texts,
    read_json_object,
)

_log = logging.getLogger(__name__)

Activation = Callable[[torch.Tensor], torch.Tensor]


class TorchRerankRunner:
    """Scores documents against a query with a cross-encoder (sequence classification, one logit).

    Implements :class:`lmaas.runtimes.base.BatchRunner`: each (query, document) pair is one row,
    tokenised as a pair and truncated longest-first to the model's maximum length, so the
    worker's batcher merges the pairs of many requests into one forward pass. The score is the
    activation sentence-transformers' ``CrossEncoder.predict`` applies by default: the one named
    in ``config_sentence_transformers.json`` or ``config.json`` (``sentence_transformers.
    activation_fn``), else a sigmoid. Only ``torch.*`` activations are instantiated, as
    sentence-transformers does without ``trust_remote_code``; others fall back to the sigmoid.

    Args:
        spec: The worker spec.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._classifier = SequenceClassifier(spec)
        self._activation: Activation = torch.sigmoid

    def load(self) -> ModelInfo:
        """Load the cross-encoder. Raises: ModelLoadError (also for more than one output)."""
        classifier = self._classifier
        classifier.load()
        if classifier.num_labels != 1:
            raise ModelLoadError(
                f"a reranker needs a cross-encoder with one output (num_labels=1); this model has "
                f"{classifier.num_labels}: import it with --task classification instead"
            )
        self._activation = _activation(Path(self._spec.model_dir), classifier.config)
        return ModelInfo(
            context_length=classifier.max_length,
            dtype=classifier.dtype,
            device=classifier.device,
            max_input_tokens=classifier.max_length,
            inputs=[TensorSpec("query", "BYTES", [1]), TensorSpec("documents", "BYTES", [-1])],
            outputs=[TensorSpec("scores", "FP32", [-1])],
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Score one short pair."""
        warm = RerankRequest("__lmaas_warmup__", "hello", ["hello world"])
        self.rerank([warm])

    def health(self) -> bool:
        return self._classifier.loaded

    def accepts(self) -> tuple[type, ...]:
        return (RerankRequest,)

    def rerank(self, requests: Sequence[RerankRequest]) -> list[ScoreResult | RequestError]:
        """Score requests in-process (warm-up, tests); the worker batches instead."""
        results = run_batch(self, requests, self._spec.max_batch_size)
        return [r for r in results if isinstance(r, ScoreResult | RequestError)]

    def preprocess(self, request: InferRequest) -> Prepared:
        """Validate and tokenise; one row per document. Raises: InvalidRequestError."""
        if not isinstance(request, RerankRequest):
            raise InvalidRequestError("this model reranks documents against a query")
        if not request.query.strip():
            raise InvalidRequestError("'query' must not be empty", param="query")
        check_texts(request.documents, "documents")
        rows = self._classifier.encode_pairs(request.query, request.documents)
        return Prepared(request.request_id, [(len(r.input_ids), r) for r in rows])

    def forward(self, payloads: list[EncodedRow]) -> list[torch.Tensor]:
        return self._classifier.logits(payloads)

    def postprocess(self, prepared: Prepared) -> ScoreResult:
        scores = self._activation(torch.stack(prepared.outputs)).squeeze(-1)
        return ScoreResult(
            request_id=prepared.request_id,
            scores=[float(s) for s in scores.tolist()],
            prompt_tokens=sum(length for length, _ in prepared.rows),
        )


def _activation(model_dir: Path, config: Any) -> Activation:
    """The activation ``CrossEncoder`` would apply, in its order of precedence."""
    st_config = read_json_object(model_dir / "config_sentence_transformers.json")
    path = st_config.get("activation_fn")
    if path is None:
        in_config = getattr(config, "sentence_transformers", None)
        if isinstance(in_config, dict):
            path = in_config.get("activation_fn")
    if path is None:
        path = getattr(config, "sbert_ce_default_activation_function", None)
    if not isinstance(path, str) or not path:
        return torch.sigmoid
    if not path.startswith("torch."):
        _log.warning("activation %r is not a torch module; using a sigmoid", path)
        return torch.sigmoid
    module_name, _, class_name = path.rpartition(".")
    try:
        module: Activation = getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"cannot build the activation {path!r}: {exc}") from exc
    return module
