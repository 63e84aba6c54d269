"""Text sequence classification on torch: class probabilities per input text."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    InferRequest,
    ModelInfo,
    RequestError,
    TensorSpec,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.classification.sequence import EncodedRow, SequenceClassifier, check_texts


class TorchTextClassificationRunner:
    """Classifies texts with a Hugging Face sequence classifier (``*ForSequenceClassification``).

    Implements :class:`lmaas.runtimes.base.BatchRunner`: each text is one row, truncated to the
    model's maximum length. Probabilities follow the ``text-classification`` pipeline of
    transformers: a softmax over the classes, or a per-class sigmoid for one-output models and
    ``problem_type: multi_label_classification``. Labels come from ``id2label``.

    Args:
        spec: The worker spec.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._classifier = SequenceClassifier(spec)
        self._sigmoid = False

    def load(self) -> ModelInfo:
        """Load the classifier. Raises: ModelLoadError."""
        classifier = self._classifier
        classifier.load()
        problem = getattr(classifier.config, "problem_type", None)
        self._sigmoid = classifier.num_labels == 1 or problem == "multi_label_classification"
        return ModelInfo(
            context_length=classifier.max_length,
            dtype=classifier.dtype,
            device=classifier.device,
            max_input_tokens=classifier.max_length,
            labels=list(classifier.labels),
            inputs=[TensorSpec("text", "BYTES", [-1])],
            outputs=[
                TensorSpec("probabilities", "FP32", [-1, classifier.num_labels]),
                TensorSpec("label", "BYTES", [-1]),
            ],
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Classify one short text."""
        self.classify([ClassifyRequest("__lmaas_warmup__", texts=["Hello world"])])

    def health(self) -> bool:
        return self._classifier.loaded

    def accepts(self) -> tuple[type, ...]:
        return (ClassifyRequest,)

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult | RequestError]:
        """Classify requests in-process (warm-up, tests); the worker batches instead."""
        results = run_batch(self, requests, self._spec.max_batch_size)
        return [r for r in results if isinstance(r, ClassifyResult | RequestError)]

    def preprocess(self, request: InferRequest) -> Prepared:
        """Validate and tokenise; one row per text. Raises: InvalidRequestError."""
        if not isinstance(request, ClassifyRequest):
            raise InvalidRequestError("this model classifies text")
        if request.images is not None or request.pixel_values is not None:
            raise InvalidRequestError(
                "this model classifies text, not images: send strings in 'input'", param="input"
            )
        if request.texts is None:
            raise InvalidRequestError("'input' must not be empty", param="input")
        check_texts(request.texts, "input")
        rows = self._classifier.encode_texts(request.texts)
        return Prepared(request.request_id, [(len(r.input_ids), r) for r in rows])

    def forward(self, payloads: list[EncodedRow]) -> list[torch.Tensor]:
        return self._classifier.logits(payloads)

    def postprocess(self, prepared: Prepared) -> ClassifyResult:
        logits = torch.stack(prepared.outputs)
        probs = torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1)
        data = probs.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
        return ClassifyResult(
            request_id=prepared.request_id,
            probs=data,
            num_inputs=probs.shape[0],
            num_labels=probs.shape[1],
            prompt_tokens=sum(length for length, _ in prepared.rows),
        )
