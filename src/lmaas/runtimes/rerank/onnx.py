"""Cross-encoder reranking with an ONNX graph (``lmaas convert --onnx``) on ONNX Runtime."""

from __future__ import annotations

from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.classification.onnx import OnnxSequenceClassifier
from lmaas.runtimes.rerank.torch import TorchRerankRunner


class OnnxRerankRunner(TorchRerankRunner):
    """:class:`TorchRerankRunner` (pair tokenisation, activation) with the forward pass on
    ONNX Runtime: the graph of ``lmaas convert --onnx`` of a cross-encoder."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._classifier = OnnxSequenceClassifier(spec)
