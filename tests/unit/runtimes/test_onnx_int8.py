"""The ``int8`` ONNX recipe: per-token activations, outlier input channels kept in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmaas.core.errors import ModelLoadError
from lmaas.runtimes.onnx_int8 import quantize_dynamic_int8, quantize_int8

VOCAB, WIDTH, OUT = 64, 96, 48
OUTLIER = 7


def _encoder(path: Path, *, outlier: float = 60.0) -> None:
    """input_ids → embedding table (channel OUTLIER huge) → MatMul + bias → MatMul."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, WIDTH)).astype(np.float32)
    table[:, OUTLIER] *= outlier
    w1 = (rng.normal(size=(WIDTH, OUT)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.normal(size=(OUT, OUT)) / np.sqrt(OUT)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="first"),
        helper.make_node("Add", ["h0", "b1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", OUT])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.full(OUT, 0.1, np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"input_ids": ids})[0]
    return out


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_outlier_channel_stays_float_and_rows_stay_close(tmp_path: Path) -> None:
    _encoder(tmp_path / "fp32.onnx")
    kept = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    assert kept == 1  # the one huge embedding channel, found by the random-id calibration run
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2
    assert ops.count("MatMul") == 1  # the float product of the outlier channel
    gathered = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == "x")
    indices = next(i for i in graph.initializer if i.name == gathered.input[1])
    assert numpy_helper.to_array(indices).tolist() == [OUTLIER]
    ids = np.random.default_rng(1).integers(0, VOCAB, (4, 11))
    fp32, int8 = _run(tmp_path / "fp32.onnx", ids), _run(tmp_path / "int8.onnx", ids)
    assert _row_cosines(int8, fp32).min() >= 0.999


def test_per_token_scales_beat_one_scale_per_tensor(tmp_path: Path) -> None:
    """One huge row in a batch costs the other rows nothing (it does with quantize_dynamic)."""
    _encoder(tmp_path / "fp32.onnx", outlier=1.0)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    quantize_dynamic_int8(tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx")
    model = onnx.load(str(tmp_path / "fp32.onnx"))  # token 0's embedding row: 200 times larger
    table = next(i for i in model.graph.initializer if i.name == "table")
    values = numpy_helper.to_array(table).copy()
    values[0] *= 200
    table.CopyFrom(numpy_helper.from_array(values, "table"))
    for name in ("int8", "dynamic"):  # the same graphs, with the scaled table
        quantized = onnx.load(str(tmp_path / f"{name}.onnx"))
        for init in quantized.graph.initializer:
            if init.name == "table":
                init.CopyFrom(numpy_helper.from_array(values, "table"))
        onnx.save(quantized, str(tmp_path / f"{name}-big.onnx"))
    onnx.save(model, str(tmp_path / "fp32-big.onnx"))
    ids = np.random.default_rng(2).integers(1, VOCAB, (2, 9))
    ids[0, 0] = 0
    fp32 = _run(tmp_path / "fp32-big.onnx", ids)[1]  # the row without the huge token
    per_token = _row_cosines(_run(tmp_path / "int8-big.onnx", ids)[1], fp32).min()
    per_tensor = _row_cosines(_run(tmp_path / "dynamic-big.onnx", ids)[1], fp32).min()
    assert per_token >= 0.999 > per_tensor


def test_graphs_without_token_ids_are_quantised_without_calibration(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "mlp.onnx"))
    assert quantize_int8(tmp_path / "mlp.onnx", tmp_path / "mlp8.onnx") == 0
    x = rng.normal(size=(5, 16)).astype(np.float32)
    out = {}
    for name in ("mlp", "mlp8"):
        session = ort.InferenceSession(
            str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]
        )
        out[name] = session.run(None, {"x": x})[0]
    assert _row_cosines(out["mlp8"], out["mlp"]).min() >= 0.999


def test_a_broken_graph_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="int8"):
        quantize_int8(tmp_path / "bad.onnx", tmp_path / "out.onnx")
