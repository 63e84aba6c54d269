"""Sentence embeddings on ONNX Runtime (CPU), from an imported ``model.onnx`` or an export.

Where the graph comes from:

* a version in ``onnx`` format (a directory with ``model.onnx`` beside the tokenizer and the
  sentence-transformers files) is run as it is;
* a ``safetensors`` version served with ``serving.backend: onnxruntime`` is exported once, at
  load time, into the worker's cache directory (see :mod:`lmaas.runtimes.onnx_export`) and the
  cached graph is reused by later loads and other replicas.

``serving.options.quantize: int8`` runs an int8 copy of that graph instead (also cached):
per-token int8 activations with outlier channels in float (:mod:`lmaas.runtimes.onnx_int8`);
``int8-dynamic`` is onnxruntime's ``quantize_dynamic`` (one activation scale per tensor).
Tokenisation, pooling and normalisation are the torch runner's
(:class:`~lmaas.runtimes.embedding.sentences.SentenceEmbedder`), so fp32 results match
sentence-transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lmaas.core.errors import InternalError, ModelLoadError
from lmaas.core.messages import (
    ModelInfo,
    WorkerSpec,
)
from lmaas.runtimes.embedding.sentences import SentenceEmbedder, SentenceRunnerBase
from lmaas.runtimes.hf_loading import load_hf_tokenizer
from lmaas.runtimes.onnx_export import (
    ENCODER_RECIPE,
    PACKED_ENCODER_INPUTS,
    PACKED_ENCODER_RECIPE,
    export_encoder,
    export_packed_encoder,
    packed_export,
    served_graph,
)
from lmaas.runtimes.onnx_session import open_session, quantize_option, worker_threads
from lmaas.runtimes.packed import first_position, graph_inputs, make_packing

_log = logging.getLogger(__name__)

_OPTIONAL_INPUTS = frozenset({"attention_mask", "token_type_ids"})


class OnnxEmbeddingRunner(SentenceRunnerBase):
    """Embeds texts (or token id lists) with an encoder graph on ONNX Runtime.

    Implements :class:`lmaas.runtimes.base.BatchRunner` exactly as the torch runner does (one
    row per input text). The graph must take ``input_ids`` (and may take ``attention_mask`` and
    ``token_type_ids``) and return token embeddings ``[batch, seq, hidden]`` as its first output
    (pooled here), or sentence vectors ``[batch, dim]`` (only normalised here).

    Args:
        spec: The worker spec; options ``quantize`` (``int8``, ``int8-dynamic``),
            ``num_threads`` (intra-op threads; default: the worker's cores) and
            ``matryoshka_dims``.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._session: ort.InferenceSession | None = None
        self._input_names: frozenset[str] = frozenset()
        self._output_name = ""
        self._pooled_output = False
        self._packed = False
        """The graph runs packed rows (``PACKED_ENCODER_INPUTS``; :mod:`lmaas.runtimes.packed`)."""
        self._first_position = 0
        self.graph_path: Path | None = None
        """The graph the session runs (the imported one, or a cached export)."""

    def load(self) -> ModelInfo:
        """Load the tokenizer, find or build the graph, open the session. Raises: ModelLoadError."""
        tokenizer = load_hf_tokenizer(self._spec)
        quantize = quantize_option(self._spec.options)
        if packed_export(self._spec):
            recipe, export = PACKED_ENCODER_RECIPE, export_packed_encoder
        else:
            recipe, export = ENCODER_RECIPE, export_encoder
        self.graph_path = served_graph(self._spec, recipe=recipe, export=export, quantize=quantize)
        self._session = open_session(self.graph_path, worker_threads(self._spec.options))
        hidden_size = self._check_signature(self._session)
        config = _read_config(Path(self._spec.model_dir))
        if hidden_size is None:
            hidden_size = int(config.get("hidden_size") or self._probe_width(tokenizer))
        self._sentences = SentenceEmbedder.from_spec(
            self._spec,
            tokenizer,
            hidden_size=hidden_size,
            max_positions=config.get("max_position_embeddings"),
            vocab_size=config.get("vocab_size"),
        )
        if self._pooled_output and len(self._sentences.config.pooling_modes) != 1:
            raise ModelLoadError("the graph returns pooled vectors; it cannot pool again")
        self._first_position = first_position(config.get("model_type"), config.get("pad_token_id"))
        _log.info(
            "loaded %s on onnxruntime (%s, %s rows)",
            self.graph_path,
            quantize or "float32",
            "packed" if self._packed else "padded",
        )
        return self._sentences.model_info(
            dtype="int8" if quantize else "float32",
            device="cpu",
            max_batch_size=self._spec.max_batch_size,
        )

    def health(self) -> bool:
        return self._session is not None

    def forward(self, payloads: list[list[int]]) -> list[torch.Tensor]:
        if self._session is None:
            raise InternalError("the model is not loaded")
        if self._packed:
            return self._forward_packed(payloads)
        ids, mask = self.sentences.pad(payloads)
        feeds = {"input_ids": ids}
        if "attention_mask" in self._input_names:
            feeds["attention_mask"] = mask
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (out,) = self._session.run([self._output_name], feeds)
        # Zero-copy views: pooling runs in torch, the same code as the torch runner's.
        vectors = torch.from_numpy(np.asarray(out, dtype=np.float32))
        if self._pooled_output:
            return list(self.sentences.normalize(vectors))
        return list(self.sentences.pool(vectors, torch.from_numpy(mask)))

    def _forward_packed(self, payloads: list[list[int]]) -> list[torch.Tensor]:
        assert self._session is not None
        lengths = [len(ids) for ids in payloads]
        ids = np.fromiter((i for row in payloads for i in row), np.int64, sum(lengths))[None]
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])[None]
        packing = graph_inputs(lengths)
        feeds = {
            "input_ids": ids,
            "position_ids": positions + self._first_position,
            "token_type_ids": np.zeros_like(ids),
            **{name: tensor.numpy() for name, tensor in packing.items()},
        }
        (out,) = self._session.run([self._output_name], feeds)
        tokens = torch.from_numpy(np.asarray(out, dtype=np.float32))  # [T, hidden]
        rows = make_packing(lengths, torch.device("cpu"))
        return list(self.sentences.pool(rows.unpack(tokens), rows.mask()))

    def _check_signature(self, session: ort.InferenceSession) -> int | None:
        """Remember the graph's inputs and output; the hidden size if the graph states it."""
        names = {i.name for i in session.get_inputs()}
        if names == set(PACKED_ENCODER_INPUTS):
            self._packed = True
            self._input_names = frozenset(names)
            output = session.get_outputs()[0]
            self._output_name = output.name
            last = output.shape[-1]
            return last if isinstance(last, int) and last > 0 else None
        if "input_ids" not in names or names - {"input_ids"} - _OPTIONAL_INPUTS:
            raise ModelLoadError(
                f"an embedding graph takes input_ids (and optionally attention_mask, "
                f"token_type_ids); this one takes {', '.join(sorted(names))}"
            )
        self._input_names = frozenset(names)
        output = session.get_outputs()[0]
        if len(output.shape) not in (2, 3):
            raise ModelLoadError(
                f"the graph's first output {output.name!r} has shape {output.shape}; expected "
                "[batch, seq, hidden] token embeddings or [batch, dim] sentence vectors"
            )
        self._output_name = output.name
        self._pooled_output = len(output.shape) == 2
        last = output.shape[-1]
        return last if isinstance(last, int) and last > 0 else None

    def _probe_width(self, tokenizer: Any) -> int:
        """Run the graph once on a short text to see its output width."""
        assert self._session is not None  # called from load() after the session opened
        ids = np.asarray([tokenizer("probe")["input_ids"]], dtype=np.int64)
        feeds = {"input_ids": ids}
        if "attention_mask" in self._input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (out,) = self._session.run([self._output_name], feeds)
        return int(np.asarray(out).shape[-1])


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}
