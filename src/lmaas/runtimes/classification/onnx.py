"""Sequence classification (text classifiers, cross-encoders) on ONNX Runtime.

Where the graph comes from:

* an ``onnx`` version (``lmaas convert --onnx``): the torch directory with ``model.onnx`` in
  place of the safetensors weights: ``config.json`` (labels, problem type), the tokenizer
  files, and the graph (``input_ids``, ``attention_mask`` and, for BERT-like models,
  ``token_type_ids``, int64 ``[batch, seq]`` → ``logits`` ``[batch, num_labels]``);
* a ``safetensors`` version served with ``serving.backend: onnxruntime``: the same graph,
  exported once at load time into the worker's cache (:mod:`lmaas.runtimes.onnx_export`).

``serving.options.quantize`` (``int8``, ``int8-dynamic``) runs a cached int8 copy of the graph,
as for embeddings. Tokenisation, padding, truncation and the probabilities are the torch
runners', so clients see the same API, labels and numbers as on torch.
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
from lmaas.runtimes.onnx_export import (
    PACKED_CLASSIFIER_INPUTS,
    PACKED_CLASSIFIER_RECIPE,
    SEQUENCE_CLASSIFIER_RECIPE,
    export_spec_packed_sequence_classifier,
    export_spec_sequence_classifier,
    packed_export,
    served_graph,
)
from lmaas.runtimes.onnx_session import open_session, quantize_option, worker_threads
from lmaas.runtimes.packed import first_position, graph_inputs

_log = logging.getLogger(__name__)

_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


class OnnxSequenceClassifier(SequenceClassifier):
    """:class:`SequenceClassifier` with the forward pass on ONNX Runtime (CPU; float32, or int8
    with ``quantize``).

    Args:
        spec: The worker spec; options ``num_threads`` (intra-op threads) and ``quantize``.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._session: Any = None
        self._input_names: frozenset[str] = frozenset()
        self._packed_graph = False
        """The graph runs packed rows (``PACKED_CLASSIFIER_INPUTS``, see ``runtimes/packed``)."""
        self._first_position = 0
        self.graph_path: Path | None = None
        """The graph the session runs (the version's own, or a cached export)."""

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Load the tokenizer, the config and the graph. Raises: ModelLoadError."""
        import transformers

        quantize = quantize_option(self._spec.options)
        if packed_export(self._spec, head=True):
            recipe, export = PACKED_CLASSIFIER_RECIPE, export_spec_packed_sequence_classifier
        else:
            recipe, export = SEQUENCE_CLASSIFIER_RECIPE, export_spec_sequence_classifier
        graph = served_graph(self._spec, recipe=recipe, export=export, quantize=quantize)
        self.graph_path = graph
        model_dir = Path(self._spec.model_dir)
        tokenizer = load_hf_tokenizer(self._spec)
        try:
            config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
            raise ModelLoadError(f"cannot read the config of {model_dir}: {exc}") from exc
        self._session = open_session(graph, worker_threads(self._spec.options))
        names = frozenset(i.name for i in self._session.get_inputs())
        self._packed_graph = names == frozenset(PACKED_CLASSIFIER_INPUTS)
        if not self._packed_graph and ("input_ids" not in names or names - _INPUTS):
            raise ModelLoadError(
                "a sequence-classification graph takes input_ids (and optionally attention_mask, "
                f"token_type_ids); this one takes {', '.join(sorted(names))}"
            )
        self._input_names = names
        self.dtype = "int8" if quantize else "float32"
        # A packed graph always takes segment ids; the tokenizer and config say whether to fill
        # them (as on torch).
        segments = None if self._packed_graph else "token_type_ids" in names
        self._set_tokenizer(tokenizer, config, uses_token_types=segments)
        self._first_position = first_position(
            getattr(config, "model_type", None), getattr(config, "pad_token_id", None)
        )
        _log.info(
            "loaded %s on onnxruntime (%s, %s rows)",
            graph,
            self.dtype,
            "packed" if self._packed_graph else "padded",
        )

    def logits(self, rows: list[EncodedRow]) -> list[torch.Tensor]:
        """Float32 logits ``[num_labels]`` per row."""
        if self._session is None:
            raise InternalError("the model is not loaded")
        if self._packed_graph:
            return self._packed_logits(rows)
        feeds = {
            name: np.ascontiguousarray(tensor.numpy())
            for name, tensor in self.padded(rows).items()
            if name in self._input_names
        }
        (logits,) = self._session.run(None, feeds)
        return list(torch.from_numpy(np.asarray(logits, dtype=np.float32)))

    def _packed_logits(self, rows: list[EncodedRow]) -> list[torch.Tensor]:
        lengths = [len(row.input_ids) for row in rows]
        total = sum(lengths)
        ids = np.fromiter((i for row in rows for i in row.input_ids), np.int64, total)[None]
        types = np.fromiter(
            (t for row in rows for t in (row.token_type_ids or [0] * len(row.input_ids))),
            np.int64,
            total,
        )[None]
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])[None]
        starts = np.cumsum([0, *lengths[:-1]], dtype=np.int64)
        feeds = {
            "input_ids": ids,
            "position_ids": positions + self._first_position,
            "token_type_ids": types,
            "starts": starts,
            **{name: tensor.numpy() for name, tensor in graph_inputs(lengths).items()},
        }
        (logits,) = self._session.run(None, feeds)
        return list(torch.from_numpy(np.asarray(logits, dtype=np.float32)))


class OnnxTextClassificationRunner(TorchTextClassificationRunner):
    """:class:`TorchTextClassificationRunner` with the forward pass on ONNX Runtime."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._classifier = OnnxSequenceClassifier(spec)
