"""Int8 copies of ONNX graphs: per-token activations with outlier channels in float (``int8``).

The recipe, for every ``MatMul`` whose weight is a constant 2-D float matrix:

* weights: symmetric int8, one scale per output column;
* activations: symmetric int8 with one scale **per row** (per token), computed at run time
  (``ReduceMax(|x|)`` over the last axis), so a short sentence, or a padded row in a batch, never
  shares a range with another row; the product runs as onnxruntime's ``MatMulIntegerToFloat``
  (u8s8 int8 GEMM, VNNI where the CPU has it) and is rescaled per row afterwards;
* outlier input channels: the few channels whose magnitude dwarfs the rest (transformer encoders
  have them after LayerNorm and GELU: on all-MiniLM-L6-v2 one LayerNorm channel reaches 28 where
  the median channel stays under 2) are found by running the float graph once on random token
  ids (graphs with an ``input_ids`` input; on all-MiniLM-L6-v2 random ids find the channels real
  text shows: they come from the weights) and kept in float: they are masked out of the int8
  product and multiplied by their weight rows in a small float ``MatMul`` (LLM.int8()'s
  decomposition, with fixed channels). Other graphs get per-token activations only.

On all-MiniLM-L6-v2 this keeps every sentence's cosine to fp32 at ≥ 0.996 (onnxruntime's
``quantize_dynamic``, one activation scale per tensor, drops short inputs to 0.965) and runs a
little faster than it, because the feed-forward output projections no longer stay in float.
``Gemm`` (and, when asked, ``Conv``) nodes go through ``quantize_dynamic`` as before.

:func:`quantize_dynamic_int8` is the previous recipe (``quantize: int8-dynamic``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmaas.core.errors import ModelLoadError

_log = logging.getLogger(__name__)

INT8_RECIPE = "per-token-int8/outliers-float/v1"
"""Names how :func:`quantize_int8` builds a graph; part of the cache key of derived graphs."""

DYNAMIC_RECIPE = "quantize-dynamic/per-channel/v1"
"""The same for :func:`quantize_dynamic_int8`."""

OUTLIER_RATIO = 4.0
"""An input channel is an outlier when its largest magnitude on the calibration inputs exceeds
this many times the median channel's."""
_MAX_OUTLIER_FRACTION = 1 / 32
"""At most this share of a MatMul's input channels stays in float."""
_CALIBRATION_SHAPES = ((8, 8), (8, 16), (8, 32), (8, 64))
"""(rows, tokens) of the random calibration batches."""


def quantize_int8(source: Path, dest: Path, *, convolutions: bool = False) -> int:
    """Write the ``int8`` recipe's copy of ``source`` to ``dest`` (see the module docstring).

    Args:
        source: A float ONNX graph.
        dest: Where the int8 graph goes (weights inline).
        convolutions: Quantise ``Conv`` weights too (``ConvInteger``).

    Returns:
        How many input channels (over all MatMuls) stayed in float.

    Raises:
        ModelLoadError: the graph cannot be quantised.
    """
    import onnx

    try:
        model = onnx.load(str(source))
        if _opset(model) < 13:  # per-axis QuantizeLinear needs opset 13
            _log.info("%s has opset < 13: using the int8-dynamic recipe", source.name)
            quantize_dynamic_int8(source, dest, convolutions=convolutions)
            return 0
        if _has_op(model, ("Gemm", *(("Conv",) if convolutions else ()))):
            model = _dynamic_gemm(source, dest, convolutions)
        targets = _weight_matmuls(model)
        outliers = _find_outliers(source, model, targets)
        kept = _rewrite_per_token(model, targets, outliers)
        onnx.save(model, str(dest))
    except ModelLoadError:
        raise
    except Exception as exc:  # onnx / onnxruntime raise many types; all mean "cannot quantise"
        raise ModelLoadError(f"int8 quantisation of {source.name} failed: {exc}") from exc
    _log.info(
        "quantised %s to int8: %d MatMuls with per-token activations, %d outlier channels in float",
        source.name, len(targets), kept,
    )  # fmt: skip
    return kept


def quantize_dynamic_int8(
    source: Path, dest: Path, *, keep_after_gelu: bool = True, convolutions: bool = False
) -> int:
    """The ``int8-dynamic`` recipe: onnxruntime's ``quantize_dynamic`` (one activation scale per
    tensor and call), int8 weights per output channel.

    Only MatMuls with a constant weight are quantised (attention's two activation products stay
    in float), and, with ``keep_after_gelu``, MatMuls fed by a GELU stay in float too: their
    inputs carry outliers that one per-tensor activation scale cannot represent.
    ``convolutions`` quantises Conv weights too (``ConvInteger``). On all-MiniLM-L6-v2: mean
    cosine to fp32 ≈ 0.996, worst sentence ≈ 0.965-0.984 (very short inputs).

    Returns:
        How many MatMuls stayed in float.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source), load_external_data=False)
    constants = _constant_names(model)
    gelu_outputs = {o for node in model.graph.node if "Gelu" in node.op_type for o in node.output}
    excluded = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and (
            not any(i in constants for i in node.input)
            or (keep_after_gelu and node.input[0] in gelu_outputs)
        )
    ]
    try:
        quantize_dynamic(
            str(source),
            str(dest),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm", *(["Conv"] if convolutions else [])],
            nodes_to_exclude=excluded,
        )
    except Exception as exc:  # the quantiser raises whatever its graph passes raise
        raise ModelLoadError(f"int8 quantisation of {source.name} failed: {exc}") from exc
    _log.info("quantised %s to int8 (%d MatMuls kept in float)", source.name, len(excluded))
    return len(excluded)


# ---------------------------------------------------------------------------- internals


def _constant_names(model: Any) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    return names | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def _opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _has_op(model: Any, op_types: Iterable[str]) -> bool:
    wanted = set(op_types)
    return any(node.op_type in wanted for node in model.graph.node)


def _dynamic_gemm(source: Path, dest: Path, convolutions: bool) -> Any:
    """``quantize_dynamic`` of the Gemm (and Conv) nodes only; the MatMuls are left as they are."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(dest),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Gemm", *(["Conv"] if convolutions else [])],
    )
    return onnx.load(str(dest))


def _weight_matmuls(model: Any) -> list[Any]:
    """MatMul nodes ``x @ W`` with ``W`` a 2-D float32 initializer."""
    from onnx import TensorProto

    weights = {
        init.name
        for init in model.graph.initializer
        if len(init.dims) == 2 and init.data_type == TensorProto.FLOAT
    }
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _calibration_feeds(model: Any) -> list[dict[str, np.ndarray]] | None:
    """Random token-id batches for a text encoder graph, or None for any other graph."""
    inputs = [i for i in model.graph.input if i.name not in _constant_names(model)]
    if not any(i.name == "input_ids" for i in inputs):
        return None
    vocab = 0
    for node in model.graph.node:  # the word-embedding table: Gather(table, input_ids)
        if node.op_type == "Gather" and node.input[1] == "input_ids":
            table = next((t for t in model.graph.initializer if t.name == node.input[0]), None)
            vocab = int(table.dims[0]) if table is not None else 0
    if vocab < 2:
        return None
    names = {i.name for i in inputs}
    if names - {"starts"} == set(_PACKED_INPUTS):
        return _packed_calibration_feeds(vocab, starts="starts" in names)
    known = {"input_ids", "attention_mask", "token_type_ids"}
    if any(i.name not in known for i in inputs):
        return None
    rng = np.random.default_rng(0)
    feeds = []
    for rows, tokens in _CALIBRATION_SHAPES:
        ids = rng.integers(1, vocab, (rows, tokens), dtype=np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        feeds.append(feed)
    return feeds


_PACKED_INPUTS = (
    "input_ids", "position_ids", "token_type_ids", "gather", "key_mask", "flat_index",
)  # fmt: skip
"""A packed encoder graph's inputs (``lmaas.runtimes.onnx_export.PACKED_ENCODER_INPUTS``)."""


def _packed_calibration_feeds(vocab: int, *, starts: bool) -> list[dict[str, np.ndarray]]:
    """The calibration batches of :data:`_CALIBRATION_SHAPES` as packed rows (with each row's
    first token for a packed classifier, ``starts``)."""
    from lmaas.runtimes.packed import graph_inputs

    rng = np.random.default_rng(0)
    feeds = []
    for rows, tokens in _CALIBRATION_SHAPES:
        ids = rng.integers(1, vocab, (1, rows * tokens), dtype=np.int64)
        # Positions from 0 (a RoBERTa-style table starts at pad + 1): the search looks at each
        # channel's peak over every token, which a shift of two positions barely moves.
        positions = np.tile(np.arange(tokens, dtype=np.int64), rows)[None]
        packing = {k: v.numpy() for k, v in graph_inputs([tokens] * rows).items()}
        feed = {"input_ids": ids, "position_ids": positions, "token_type_ids": np.zeros_like(ids)}
        if starts:
            feed["starts"] = np.arange(rows, dtype=np.int64) * tokens
        feeds.append(feed | packing)
    return feeds


def _find_outliers(source: Path, model: Any, targets: list[Any]) -> dict[str, np.ndarray]:
    """Input tensor name → indices of its outlier channels (empty when not calibratable)."""
    import onnx
    import onnxruntime as ort

    feeds = _calibration_feeds(model)
    names = sorted({n.input[0] for n in targets})
    if feeds is None or not names:
        return {}
    probe = onnx.load(str(source))
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        peaks: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed), strict=True):
                peak = np.abs(np.asarray(value)).reshape(-1, value.shape[-1]).max(axis=0)
                peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    except Exception as exc:  # a graph that needs other inputs: no outlier handling
        _log.warning("int8: calibration run failed (%s); no channels kept in float", exc)
        return {}
    outliers = {}
    for name, peak in peaks.items():
        candidates = np.flatnonzero(peak > OUTLIER_RATIO * np.median(peak))
        limit = max(1, int(peak.size * _MAX_OUTLIER_FRACTION))
        outliers[name] = np.sort(candidates[np.argsort(-peak[candidates])][:limit])
    return outliers


def _rewrite_per_token(
    model: Any, targets: list[Any], outliers: dict[str, np.ndarray]
) -> int:  # fmt: skip
    """Replace each target MatMul with the per-token int8 product (+ the float outlier part)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    targets_by_name = {id(n): n for n in targets}
    consts = [
        numpy_helper.from_array(np.array([-1], np.int64), "i8_minus_one"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "i8_tiny"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "i8_inv127"),
        numpy_helper.from_array(np.array(0.0, np.float32), "i8_zero_f"),
        numpy_helper.from_array(np.array(128.0, np.float32), "i8_128_f"),
        numpy_helper.from_array(np.array(1.0, np.float32), "i8_one"),
        numpy_helper.from_array(np.array(128, np.uint8), "i8_zp"),
    ]
    added = list(consts) if targets else []
    nodes: list[Any] = []
    axes_as_input = _opset(model) >= 18  # ReduceMax took its axes as an attribute before
    quantized: dict[str, tuple[str, str]] = {}  # input → (uint8 tensor, per-row scale [..., 1])
    weights_done: dict[tuple[str, str], str] = {}
    kept = 0
    for node in graph.node:
        if id(node) not in targets_by_name:
            nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        idx = outliers.get(x, np.zeros(0, np.int64)).astype(np.int64)
        p = f"{x}_i8"
        width = int(initializers[w_name].dims[0])
        if x not in quantized:
            source = x
            added.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{p}_2d"))
            if idx.size:
                mask = np.ones(width, np.float32)
                mask[idx] = 0
                added += [
                    numpy_helper.from_array(mask, f"{p}_mask"),
                    numpy_helper.from_array(idx, f"{p}_outlier_idx"),
                ]
                nodes += [
                    helper.make_node("Mul", [x, f"{p}_mask"], [f"{p}_inliers"]),
                    helper.make_node("Gather", [x, f"{p}_outlier_idx"], [f"{p}_outliers"], axis=-1),
                ]
                source = f"{p}_inliers"
                kept += int(idx.size)
            nodes += [
                helper.make_node("Abs", [source], [f"{p}_abs"]),
                helper.make_node("ReduceMax", [f"{p}_abs", "i8_minus_one"], [f"{p}_amax"])
                if axes_as_input
                else helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_amax"], axes=[-1]),
                helper.make_node("Max", [f"{p}_amax", "i8_tiny"], [f"{p}_amax_nz"]),
                helper.make_node("Mul", [f"{p}_amax_nz", "i8_inv127"], [f"{p}_scale"]),
                helper.make_node("Reshape", [f"{p}_scale", "i8_minus_one"], [f"{p}_scale_1d"]),
                # a uint8 zero point of 128 per row, shaped like the scale
                helper.make_node("Mul", [f"{p}_scale_1d", "i8_zero_f"], [f"{p}_zeros"]),
                helper.make_node("Add", [f"{p}_zeros", "i8_128_f"], [f"{p}_zp_f"]),
                helper.make_node("Cast", [f"{p}_zp_f"], [f"{p}_zp"], to=TensorProto.UINT8),
                helper.make_node("Shape", [source], [f"{p}_shape"]),
                helper.make_node("Reshape", [source, f"{p}_2d"], [f"{p}_rows"]),
                helper.make_node(
                    "QuantizeLinear",
                    [f"{p}_rows", f"{p}_scale_1d", f"{p}_zp"],
                    [f"{p}_q_rows"],
                    axis=0,
                ),
                helper.make_node("Reshape", [f"{p}_q_rows", f"{p}_shape"], [f"{p}_q"]),
            ]
            quantized[x] = (f"{p}_q", f"{p}_scale")
        q, scale = quantized[x]
        y = node.output[0]
        name = node.name or f"{y}_matmul"
        w = f"{w_name}_i8_{len(weights_done)}"  # unique per (weight, input): a tied weight too
        if (w_name, x) in weights_done:
            w = weights_done[(w_name, x)]
        else:
            weights_done[(w_name, x)] = w
            added += _int8_weight(numpy_helper.to_array(initializers[w_name]), idx, w)
        main = y if idx.size == 0 else f"{y}_i8_main"
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [q, w, "i8_one", f"{w}_scale", "i8_zp"],
                [f"{y}_i8_raw"],
                domain="com.microsoft",
                name=f"{name}_int8",
            ),
            helper.make_node("Mul", [f"{y}_i8_raw", scale], [main], name=f"{name}_row_scale"),
        ]
        if idx.size:
            nodes += [
                helper.make_node(
                    "MatMul", [f"{p}_outliers", f"{w}_outlier_rows"], [f"{y}_i8_out"],
                    name=f"{name}_outliers",
                ),
                helper.make_node("Add", [main, f"{y}_i8_out"], [y], name=f"{name}_sum"),
            ]  # fmt: skip
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    used = _used_names(graph) | {o.name for o in graph.output}
    live = [init for init in graph.initializer if init.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(live)
    if targets and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return kept


def _used_names(graph: Any) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If, Loop, Scan) reads."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _used_names(sub)
    return names


def _int8_weight(weight: np.ndarray, outliers: np.ndarray, name: str) -> list[Any]:
    """``name`` (int8, symmetric per column), ``name_scale`` and, with outlier input channels,
    ``name_outlier_rows`` (their float rows; zeroed in the int8 matrix)."""
    from onnx import numpy_helper

    weight = weight.astype(np.float32)
    tensors = []
    if outliers.size:
        tensors.append(numpy_helper.from_array(weight[outliers, :].copy(), f"{name}_outlier_rows"))
        weight = weight.copy()
        weight[outliers, :] = 0
    scale = (np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127).astype(np.float32)
    int8 = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return [
        *tensors,
        numpy_helper.from_array(int8, name),
        numpy_helper.from_array(scale, f"{name}_scale"),
    ]
