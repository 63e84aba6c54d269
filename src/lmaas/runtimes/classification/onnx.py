"""Sequence classification with an ONNX graph (``lmaas convert --onnx``) on ONNX Runtime.

The version directory is the torch one with ``model.onnx`` in place of the safetensors weights:
``config.json`` (labels, problem type), the tokenizer files, and the graph (``input_ids``,
``attention_mask`` and, for BERT-like models, ``token_type_ids``, int64 ``[batch, seq]`` →
``logits`` ``[batch, num_labels]``). Tokenisation, padding, truncation and the probabilities are
the torch runners', so clients see the same API, labels and numbers as for the parent version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmaas.core.errors import InternalError, ModelLoadError
from lmaas.core.messages import WorkerSpec
from lmaas.runtimes.classification.sequence import EncodedRow, SequenceClassifier
from lmaas.runtimes.classification.torch import TorchTextClassificationRunner
from lmaas.runtimes.hf_loading import load_hf_tokenizer
from lmaas.runtimes.onnx_session import open_session, worker_threads

_log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


class OnnxSequenceClassifier(SequenceClassifier):
    """:class:`SequenceClassifier` with the forward pass on ONNX Runtime (CPU, float32).

    Args:
        spec: The worker spec; ``num_threads`` sets the intra-op threads.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._session: Any = None
        self._input_names: frozenset[str] = frozenset()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Load the tokenizer, the config and the graph. Raises: ModelLoadError."""
        import transformers

        model_dir = Path(self._spec.model_dir)
        graph = model_dir / GRAPH_FILE
        if not graph.is_file():
            raise ModelLoadError(f"{model_dir} has no {GRAPH_FILE}")
        tokenizer = load_hf_tokenizer(self._spec)
        try:
            config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            raise ModelLoadError(f"cannot read the config of {model_dir}: {exc}") from exc
        self._session = open_session(graph, worker_threads(self._spec.options))
        names = frozenset(i.name for i in self._session.get_inputs())
        if "input_ids" not in names or names - _INPUTS:
            raise ModelLoadError(
                "a sequence-classification graph takes input_ids (and optionally attention_mask, "
                f"token_type_ids); this one takes {', '.join(sorted(names))}"
            )
        self._input_names = names
        self.dtype = "float32"
        self._set_tokenizer(tokenizer, config, uses_token_types="token_type_ids" in names)
        _log.info("loaded %s on onnxruntime", graph)

    def logits(self, rows: list[EncodedRow]) -> list[torch.Tensor]:
        """Float32 logits ``[num_labels]`` per row."""
        if self._session is None:
            raise InternalError("the model is not loaded")
        feeds = {
            name: np.ascontiguousarray(tensor.numpy())
            for name, tensor in self.padded(rows).items()
            if name in self._input_names
        }
        (logits,) = self._session.run(None, feeds)
        return list(torch.from_numpy(np.asarray(logits, dtype=np.float32)))


class OnnxTextClassificationRunner(TorchTextClassificationRunner):
    """:class:`TorchTextClassificationRunner` with the forward pass on ONNX Runtime."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._classifier = OnnxSequenceClassifier(spec)
