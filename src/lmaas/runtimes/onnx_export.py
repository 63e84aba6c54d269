"""Exporting Hugging Face models to ONNX: the graphs the ONNX Runtime runners serve.

One exporter per task family, shared by the worker (a ``safetensors`` version served with
``serving.backend: onnxruntime`` is exported once, at load time, into the worker's cache) and
by ``lmaas convert --onnx`` (which stores the graph as a new ``onnx`` version), so both run
the same graph:

* encoders (embeddings): ``input_ids``, ``attention_mask`` → ``last_hidden_state``
  ``[batch, seq, hidden]`` (pooling stays outside the graph, shared with the torch runner);
  encoders of the packed families (:mod:`lmaas.runtimes.packed`) on packed rows instead
  (``PACKED_ENCODER_INPUTS`` → ``[T, hidden]``), with no padding in the linear layers;
* sequence classifiers (text classification, cross-encoder rerank): ``input_ids``,
  ``attention_mask`` and, when the model uses segment ids (BERT pairs), ``token_type_ids`` →
  ``logits`` ``[batch, num_labels]``;
* image classifiers: ``pixel_values`` ``[batch, C, H, W]`` → ``logits`` ``[batch, labels]``.

Token inputs are int64 ``[batch, seq]`` with both axes dynamic; images have a dynamic batch.
The dynamo exporter is used: the TorchScript one bakes the traced sequence length into
transformers' attention-mask code. Exports are float32 whatever the spec's ``quantize`` says:
int8 copies are made from the exported graph (:func:`served_graph`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import onnxruntime as ort
import torch

from lmaas.core.errors import ModelLoadError
from lmaas.core.messages import WorkerSpec
from lmaas.core.types import ModelFormat
from lmaas.runtimes.hf_loading import load_hf_model
from lmaas.runtimes.int8_weights import INT8_WEIGHTS_FILE
from lmaas.runtimes.onnx_int8 import (
    DYNAMIC_RECIPE,
    INT8_RECIPE,
    quantize_dynamic_int8,
    quantize_int8,
)
from lmaas.runtimes.onnx_session import build_once, cache_dir, source_digest
from lmaas.runtimes.packed import (
    PACKED_FAMILIES,
    PACKED_HEADS,
    PackedEncoder,
    classification_head,
    first_position,
    graph_inputs,
    graph_packing,
    packed_option,
)

_log = logging.getLogger(__name__)

GRAPH_FILENAME = "model.onnx"
"""The graph's name in an ``onnx`` version directory and in the cache."""

ENCODER_RECIPE = "encoder-last-hidden-state/dynamo/v1"
PACKED_ENCODER_RECIPE = "encoder-packed-last-hidden-state/dynamo/v1"
SEQUENCE_CLASSIFIER_RECIPE = "sequence-classifier-logits/dynamo/v1"
PACKED_CLASSIFIER_RECIPE = "sequence-classifier-packed-logits/dynamo/v1"
IMAGE_CLASSIFIER_RECIPE = "image-classifier-logits/dynamo/v1"
"""Names of how each exporter builds a graph; part of the cache key, so a change to an
exporter (bump its recipe) re-exports instead of reusing an old graph."""

_EXTERNAL_DATA_BYTES = 1 << 30
"""Above this many weight bytes the graph keeps its weights in a side file (protobuf's 2 GiB
limit, with room to spare)."""

Exporter = Callable[[WorkerSpec, Path], None]
"""Writes the float32 graph of a spec's safetensors model to the given path."""


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporter's chatter out of logs and terminals: its progress lines (stdout), its
    warnings about internals, and its log lines (``torch.onnx`` warns that torchvision is not
    installed, which no lmaas export needs)."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
            torch.inference_mode(False),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def served_graph(
    spec: WorkerSpec, *, recipe: str, export: Exporter, quantize: str | None = None
) -> Path:
    """The graph a runner opens for ``spec``: the version's own ``model.onnx`` (``onnx``
    format), or the cached export of its safetensors model (built by ``export`` on first use),
    then, with ``quantize`` (``int8``, ``int8-dynamic``), the cached int8 copy of that graph.

    Cached graphs sit in folders named by a digest of the version's files (the manifest's
    digests), the recipe and the torch / onnxruntime versions; two workers loading at once
    build a graph once (see :func:`~lmaas.runtimes.onnx_session.build_once`).

    Raises:
        ModelLoadError: no graph in an ``onnx`` version, or the export or quantisation failed.
    """
    model_dir = Path(spec.model_dir)
    if spec.format == ModelFormat.ONNX.value:
        graph = model_dir / GRAPH_FILENAME
        if not graph.is_file():
            raise ModelLoadError(f"{model_dir.name} has no {GRAPH_FILENAME}")
    else:
        folder = cache_dir(spec) / f"onnx-{source_digest(spec, recipe, _versions())}"
        graph = build_once(folder / GRAPH_FILENAME, lambda tmp: export(spec, tmp))
    if quantize is None:
        return graph
    dynamic = quantize == "int8-dynamic"
    int8_recipe = DYNAMIC_RECIPE if dynamic else INT8_RECIPE
    digest = source_digest(spec, str(graph), int8_recipe, _versions())

    def build(tmp: Path) -> int:
        return quantize_dynamic_int8(graph, tmp) if dynamic else quantize_int8(graph, tmp)

    return build_once(cache_dir(spec) / f"{quantize}-{digest}" / "model.int8.onnx", build)


def export_module(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    dest: Path,
    *,
    input_names: list[str],
    dynamic_axes: dict[str, tuple[str | None, ...]],
) -> None:
    """Export ``module`` (tensors in, one tensor out) to ``dest`` with the dynamo exporter.

    Args:
        module: Returns the graph's one output, named ``logits`` or ``last_hidden_state``
            (its ``output_name`` attribute).
        example: Inputs to trace with (every dynamic axis at least 2 long).
        dest: The graph file.
        input_names: One per ``example`` tensor.
        dynamic_axes: Input name → names of its leading axes (``("batch", "seq")``); None for
            a static one; the same name on several inputs is one shared size.

    Raises:
        ModelLoadError: the exporter cannot trace the model.
    """
    dims: dict[str, Any] = {}
    shapes = {
        name: {
            i: dims.setdefault(axis, torch.export.Dim(axis))
            for i, axis in enumerate(axes)
            if axis is not None
        }
        for name, axes in dynamic_axes.items()
    }
    num_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with quiet_exporter():
            torch.onnx.export(
                module.eval(), example, str(dest), input_names=input_names,
                output_names=[str(getattr(module, "output_name", "output"))], dynamo=True,
                dynamic_shapes=shapes, external_data=num_bytes > _EXTERNAL_DATA_BYTES,
                optimize=True,
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise ModelLoadError(f"cannot export the model to ONNX: {exc}") from exc
    _log.info("exported %s to ONNX (%d MB of weights)", dest.name, num_bytes >> 20)


# ---------------------------------------------------------------------------------- encoders


class _LastHiddenState(torch.nn.Module):
    """The encoder with a plain tensor output (ONNX graphs have no ``ModelOutput``)."""

    output_name = "last_hidden_state"

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        return out


def export_encoder(spec: WorkerSpec, dest: Path) -> None:
    """Export the float32 encoder (``AutoModel``) of ``spec.model_dir`` to ``dest``.

    Raises:
        ModelLoadError: the model cannot be loaded or exported.
    """
    model, _ = load_hf_model(float_spec(spec), "AutoModel", torch.float32)
    export_module(
        _LastHiddenState(model), _token_example(2), dest, input_names=list(TOKEN_INPUTS[:2]),
        dynamic_axes={name: ("batch", "seq") for name in TOKEN_INPUTS[:2]},
    )  # fmt: skip


PACKED_ENCODER_INPUTS = (
    "input_ids", "position_ids", "token_type_ids", "gather", "key_mask", "flat_index",
)  # fmt: skip
"""A packed encoder graph's inputs: ``[1, T]`` ids, positions and segment ids of the packed
tokens, then :func:`lmaas.runtimes.packed.graph_inputs` (``gather [rows, longest]``,
``key_mask [rows, longest]`` bool, ``flat_index [T]``); its output is ``[T, hidden]``."""


class _PackedLastHiddenState(torch.nn.Module):
    """The encoder on packed rows (:mod:`lmaas.runtimes.packed`) with plain tensors in and out."""

    output_name = "last_hidden_state"

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        PackedEncoder(model)  # registers the packed attention and switches the model to it

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        gather: torch.Tensor,
        key_mask: torch.Tensor,
        flat_index: torch.Tensor,
    ) -> torch.Tensor:
        out: torch.Tensor = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            lmaas_packing=graph_packing(gather, key_mask, flat_index),
        ).last_hidden_state[0]
        return out


def packed_export(spec: WorkerSpec, *, head: bool = False) -> bool:
    """Whether the packed exporters apply: a ``safetensors`` version of a packed family
    (``config.json``'s ``model_type``; with ``head``, also an architecture in
    ``PACKED_HEADS``), option ``packed`` not false."""
    if spec.format == ModelFormat.ONNX.value or not packed_option(spec.options):
        return False
    try:
        config = msgspec.json.decode((Path(spec.model_dir) / "config.json").read_bytes())
        model_type, architectures = config.get("model_type"), config.get("architectures") or []
    except (OSError, msgspec.DecodeError, AttributeError):
        return False
    if head and not (len(architectures) == 1 and architectures[0] in PACKED_HEADS):
        return False
    return model_type in PACKED_FAMILIES


def _packed_example(model: Any) -> tuple[torch.Tensor, ...]:
    """Inputs to trace a packed graph with: every dynamic size at least 2, T != rows *
    longest."""
    lengths = [8, 5]
    total = sum(lengths)
    config = model.config
    positions = torch.cat([torch.arange(n) for n in lengths])
    positions += first_position(config.model_type, config.pad_token_id)
    packed = graph_inputs(lengths)
    return (
        torch.full((1, total), 5, dtype=torch.long), positions.unsqueeze(0),
        torch.zeros((1, total), dtype=torch.long),
        packed["gather"], packed["key_mask"], packed["flat_index"],
        torch.tensor([0, lengths[0]], dtype=torch.long),
    )  # fmt: skip


_PACKED_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": (None, "tokens"), "position_ids": (None, "tokens"),
    "token_type_ids": (None, "tokens"), "gather": ("rows", "longest"),
    "key_mask": ("rows", "longest"), "flat_index": ("tokens",), "starts": ("rows",),
}  # fmt: skip


def export_packed_encoder(spec: WorkerSpec, dest: Path) -> None:
    """Export the float32 encoder of ``spec.model_dir`` on packed rows to ``dest``.

    Raises:
        ModelLoadError: the model cannot be loaded or exported.
    """
    model, _ = load_hf_model(float_spec(spec), "AutoModel", torch.float32)
    if not PackedEncoder.supports(model):
        raise ModelLoadError(f"{type(model).__name__} cannot run on packed rows")
    names = list(PACKED_ENCODER_INPUTS)
    export_module(
        _PackedLastHiddenState(model), _packed_example(model)[: len(names)], dest,
        input_names=names, dynamic_axes={name: _PACKED_AXES[name] for name in names},
    )  # fmt: skip


# ---------------------------------------------------------------------- sequence classifiers

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Logits(torch.nn.Module):
    """``input_ids, attention_mask`` → logits (ONNX graphs have no ``ModelOutput``)."""

    output_name = "logits"

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out


class _LogitsWithSegments(_Logits):
    """``input_ids, attention_mask, token_type_ids`` → logits."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        return out


def uses_segments(model: Any, tokenizer: Any) -> bool:
    """Whether the runner feeds ``token_type_ids`` (the torch runner's own rule)."""
    return (
        "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        and int(getattr(model.config, "type_vocab_size", 0) or 0) > 1
    )


def input_names(segments: bool) -> list[str]:
    """A sequence classifier graph's input names."""
    return list(TOKEN_INPUTS if segments else TOKEN_INPUTS[:2])


def export_sequence_classifier(model: Any, segments: bool, dest: Path) -> None:
    """Export ``model`` (a float ``*ForSequenceClassification``) to ``dest``.

    Raises:
        ModelLoadError: the exporter cannot trace the model.
    """
    names = input_names(segments)
    wrapper = _LogitsWithSegments(model) if segments else _Logits(model)
    export_module(
        wrapper, _token_example(len(names)), dest, input_names=names,
        dynamic_axes={name: ("batch", "seq") for name in names},
    )  # fmt: skip


def export_spec_sequence_classifier(spec: WorkerSpec, dest: Path) -> None:
    """:func:`export_sequence_classifier` of the float32 model of ``spec.model_dir``.

    Raises:
        ModelLoadError: the model cannot be loaded or exported.
    """
    model, tokenizer = load_hf_model(
        float_spec(spec), "AutoModelForSequenceClassification", torch.float32
    )
    export_sequence_classifier(model, uses_segments(model, tokenizer), dest)


PACKED_CLASSIFIER_INPUTS = (*PACKED_ENCODER_INPUTS, "starts")
"""A packed sequence classifier's inputs: the packed encoder's and ``starts [rows]`` (each
row's first token); its output is ``logits [rows, num_labels]``."""


class _PackedLogits(torch.nn.Module):
    """A sequence classifier on packed rows: the encoder packed, the head on first tokens."""

    output_name = "logits"

    def __init__(self, model: Any) -> None:
        super().__init__()
        head = classification_head(model)
        if head is None or not PackedEncoder.supports(model.base_model):
            raise ModelLoadError(f"{type(model).__name__} cannot run on packed rows")
        self.model = model  # the head's weights are the model's: registered for the exporter
        self.encoder, self._head = _PackedLastHiddenState(model.base_model), head

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        gather: torch.Tensor,
        key_mask: torch.Tensor,
        flat_index: torch.Tensor,
        starts: torch.Tensor,
    ) -> torch.Tensor:
        tokens = self.encoder(input_ids, position_ids, token_type_ids, gather, key_mask, flat_index)
        return self._head(tokens.index_select(0, starts).unsqueeze(1))


def export_spec_packed_sequence_classifier(spec: WorkerSpec, dest: Path) -> None:
    """Export the float32 sequence classifier of ``spec.model_dir`` on packed rows.

    Raises:
        ModelLoadError: the model cannot be loaded or exported.
    """
    model, _ = load_hf_model(float_spec(spec), "AutoModelForSequenceClassification", torch.float32)
    names = list(PACKED_CLASSIFIER_INPUTS)
    export_module(
        _PackedLogits(model), _packed_example(model), dest, input_names=names,
        dynamic_axes={name: _PACKED_AXES[name] for name in names},
    )  # fmt: skip


# -------------------------------------------------------------------------- image classifiers


class _PixelLogits(torch.nn.Module):
    """``pixel_values`` → logits."""

    output_name = "logits"

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(pixel_values=pixel_values).logits
        return out


def export_image_classifier(model: Any, shape: tuple[int, ...], dest: Path) -> None:
    """Export ``model`` (``[N, *shape]`` float pixels → logits) to ``dest``.

    Raises:
        ModelLoadError: the exporter cannot trace the model.
    """
    example = (torch.zeros((2, *shape), dtype=torch.float32),)
    export_module(
        _PixelLogits(model), example, dest, input_names=["pixel_values"],
        dynamic_axes={"pixel_values": ("batch",)},
    )  # fmt: skip


# ------------------------------------------------------------------------------------ helpers


def float_spec(spec: WorkerSpec) -> WorkerSpec:
    """``spec`` without ``quantize``: the export reads the float weights, quantisation happens
    on the exported graph. Raises: ModelLoadError for versions whose weights are int8."""
    if (Path(spec.model_dir) / INT8_WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f"{Path(spec.model_dir).name} holds int8 torch weights (lmaas compress --int8), "
            "which the ONNX exporter cannot read: serve it with serving.backend torch, or serve "
            "its float parent with serving.backend onnxruntime and the option quantize=int8"
        )
    options = {k: v for k, v in spec.options.items() if k != "quantize"}
    return msgspec.structs.replace(spec, options=options)


def _token_example(num_inputs: int) -> tuple[torch.Tensor, ...]:
    ids = torch.full((2, 8), 5, dtype=torch.long)
    others = (torch.ones((2, 8), dtype=torch.long), torch.zeros((2, 8), dtype=torch.long))
    return (ids, *others[: num_inputs - 1])


def _versions() -> str:
    return f"torch {torch.__version__} onnxruntime {ort.__version__}"
