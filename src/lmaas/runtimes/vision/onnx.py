"""Image classification on ONNX Runtime.

Where the graph comes from:

* an ``onnx`` version (``lmaas convert --onnx``): the torch directory with ``model.onnx`` in
  place of the safetensors weights: ``config.json`` (labels), ``preprocessor_config.json`` (the
  image processor) and the graph (``pixel_values`` ``[N, 3, H, W]`` → ``logits`` ``[N, C]``);
* a ``safetensors`` version served with ``serving.backend: onnxruntime``: the same graph,
  exported once at load time into the worker's cache (:mod:`lmaas.runtimes.onnx_export`).

``serving.options.quantize`` (``int8``, ``int8-dynamic``) runs a cached int8 copy of the graph
(MatMul and Gemm weights; convolutions stay float). Decoding and preprocessing are the torch
runner's, so a client sees the same API, labels and inputs as on torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmaas.core.errors import InternalError, ModelLoadError
from lmaas.core.messages import ModelInfo, TensorSpec, WorkerSpec
from lmaas.runtimes.onnx_export import (
    IMAGE_CLASSIFIER_RECIPE,
    export_image_classifier,
    float_spec,
    served_graph,
)
from lmaas.runtimes.onnx_session import open_session, quantize_option, worker_threads
from lmaas.runtimes.vision.torch import TorchImageClassificationRunner, load_image_classifier

_log = logging.getLogger(__name__)


class OnnxImageClassificationRunner(TorchImageClassificationRunner):
    """:class:`TorchImageClassificationRunner` with the forward pass on ONNX Runtime.

    Args:
        spec: The worker spec; options ``num_threads`` (intra-op threads) and ``quantize``.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._session: Any = None
        self._input_name = "pixel_values"
        self.graph_path: Path | None = None
        """The graph the session runs (the version's own, or a cached export)."""

    def load(self) -> ModelInfo:
        """Load the image processor, the labels and the graph. Raises: ModelLoadError."""
        import transformers

        model_dir = Path(self._spec.model_dir)
        try:
            self._processor = transformers.AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                str(model_dir), local_files_only=True
            )
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except Exception as exc:  # transformers raises OSError, ValueError, ...
            raise ModelLoadError(f"cannot load the image processor of {model_dir}: {exc}") from exc
        id2label = config.get("id2label") or {}
        self._labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        self._pixel_shape = self._processed_shape()
        quantize = quantize_option(self._spec.options)
        self.graph_path = served_graph(
            self._spec, recipe=IMAGE_CLASSIFIER_RECIPE, export=self._export, quantize=quantize
        )
        self._session = open_session(self.graph_path, worker_threads(self._spec.options))
        self._input_name = self._session.get_inputs()[0].name
        channels, height, width = self._pixel_shape
        _log.info("loaded %s on onnxruntime (%s)", self.graph_path, quantize or "float32")
        return ModelInfo(
            context_length=0,
            dtype="int8" if quantize else "float32",
            device="cpu",
            labels=self._labels,
            inputs=[
                TensorSpec("image", "BYTES", [-1]),
                TensorSpec("pixel_values", "FP32", [-1, channels, height, width]),
            ],
            outputs=[
                TensorSpec("probabilities", "FP32", [-1, len(self._labels)]),
                TensorSpec("label", "BYTES", [-1]),
            ],
            max_batch_size=self._spec.max_batch_size,
        )

    def _export(self, spec: WorkerSpec, dest: Path) -> None:
        """Export the version's float32 classifier for pixels of the processor's shape."""
        model, _ = load_image_classifier(float_spec(spec), torch.float32)
        export_image_classifier(model, self._pixel_shape, dest)

    def health(self) -> bool:
        return self._session is not None

    def forward(self, payloads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._session is None:
            raise InternalError("the model is not loaded")
        batch = torch.stack(payloads).to(torch.float32).numpy()
        (logits,) = self._session.run(None, {self._input_name: np.ascontiguousarray(batch)})
        return list(torch.softmax(torch.from_numpy(logits).float(), dim=-1))
