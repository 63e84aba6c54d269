"""OnnxTensorRunner against onnxruntime itself: signature, checks, batching, outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from runtimes_helpers import make_spec

from lmaas.core.messages import RequestError, TensorData, TensorRequest, TensorResult, TensorSpec
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.tensor.onnx import OnnxTensorRunner
from lmaas.testing.tiny_onnx import build_tiny_bf16, build_tiny_mlp, build_tiny_two_io


@pytest.fixture(scope="session")
def onnx_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-onnx")
    build_tiny_mlp(root / "mlp" / "mlp.onnx", seed=1)
    build_tiny_mlp(root / "fixed" / "fixed.onnx", seed=1, dynamic_batch=False)
    build_tiny_two_io(root / "two" / "two.onnx", seed=2)
    build_tiny_bf16(root / "bf16" / "bf16.onnx", seed=3)
    return {name: root / name for name in ("mlp", "fixed", "two", "bf16")}


def _runner(model_dir: Path) -> OnnxTensorRunner:
    runner = create_runner(make_spec(model_dir, task="tensor", format="onnx"))
    assert isinstance(runner, OnnxTensorRunner)
    runner.load()
    return runner


def _fp32(name: str, array: np.ndarray) -> TensorData:
    return TensorData(name, "FP32", list(array.shape), array.astype("<f4").tobytes())


def _int64(name: str, array: np.ndarray) -> TensorData:
    return TensorData(name, "INT64", list(array.shape), array.astype("<i8").tobytes())


def _array(tensor: TensorData) -> np.ndarray:
    dtype = {"FP32": "<f4", "INT64": "<i8"}[tensor.datatype]
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


def _reference(model_dir: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    (graph,) = model_dir.glob("*.onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, feeds)]


def test_signature_is_read_from_the_graph(onnx_dirs: dict[str, Path]) -> None:
    info = _runner(onnx_dirs["two"]).load()
    assert info.inputs == [
        TensorSpec("features", "FP32", [-1, 4]),
        TensorSpec("offset", "INT64", [-1, 2]),
    ]
    assert info.outputs == [
        TensorSpec("scaled", "FP32", [-1, 4]),
        TensorSpec("label", "INT64", [-1]),
    ]
    fixed = _runner(onnx_dirs["fixed"]).load()
    assert fixed.inputs == [TensorSpec("x", "FP32", [2, 4])]


def test_batched_requests_match_onnxruntime_run_one_by_one(onnx_dirs: dict[str, Path]) -> None:
    runner = _runner(onnx_dirs["two"])
    rng = np.random.default_rng(0)
    sizes = [1, 3, 2, 5]
    feeds = [
        {
            "features": rng.standard_normal((n, 4)).astype(np.float32),
            "offset": rng.integers(-3, 3, (n, 2)),
        }
        for n in sizes
    ]
    requests = [
        TensorRequest(str(i), [_fp32("features", f["features"]), _int64("offset", f["offset"])])
        for i, f in enumerate(feeds)
    ]
    forwarded: list[int] = []
    original = runner._run

    def counting_run(*args: object) -> object:
        forwarded.append(1)
        return original(*args)  # type: ignore[arg-type]

    runner._run = counting_run  # type: ignore[method-assign]
    results = run_batch(runner, requests, max_batch_size=8)
    assert len(forwarded) == 1  # four requests, one onnxruntime call
    for result, f in zip(results, feeds, strict=True):
        assert isinstance(result, TensorResult)
        scaled, label = _reference(onnx_dirs["two"], f)
        assert [t.name for t in result.outputs] == ["scaled", "label"]
        np.testing.assert_allclose(_array(result.outputs[0]), scaled, rtol=1e-6)
        np.testing.assert_array_equal(_array(result.outputs[1]), label)


def test_requested_outputs_only(onnx_dirs: dict[str, Path]) -> None:
    runner = _runner(onnx_dirs["two"])
    x, off = np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64)
    request = TensorRequest("r", [_fp32("features", x), _int64("offset", off)], outputs=["label"])
    [result] = run_batch(runner, [request])
    assert isinstance(result, TensorResult)
    assert [(t.name, t.datatype, t.shape) for t in result.outputs] == [("label", "INT64", [2])]


def test_fixed_batch_graph_runs_requests_one_by_one(onnx_dirs: dict[str, Path]) -> None:
    runner = _runner(onnx_dirs["fixed"])
    xs = [np.full((2, 4), i, np.float32) for i in range(3)]
    results = run_batch(runner, [TensorRequest(str(i), [_fp32("x", x)]) for i, x in enumerate(xs)])
    for result, x in zip(results, xs, strict=True):
        assert isinstance(result, TensorResult)
        (expected,) = _reference(onnx_dirs["fixed"], {"x": x})
        np.testing.assert_allclose(_array(result.outputs[0]), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ([_fp32("features", np.ones((1, 4)))], None, "missing input 'offset'"),
        (
            [_fp32("features", np.ones((1, 4))), _int64("offset", np.ones((1, 2))),
             _fp32("extra", np.ones((1,)))],
            None,
            "unknown input 'extra'",
        ),
        (
            [_fp32("features", np.ones((1, 4))), _fp32("offset", np.ones((1, 2)))],
            None,
            "input 'offset' must be INT64, got FP32",
        ),
        (
            [_fp32("features", np.ones((4,))), _int64("offset", np.ones((1, 2)))],
            None,
            "input 'features' must have 2 dimensions",
        ),
        (
            [_fp32("features", np.ones((1, 5))), _int64("offset", np.ones((1, 2)))],
            None,
            "dimension 1 must be 4",
        ),
        (
            [_fp32("features", np.ones((1, 4))), _int64("offset", np.ones((1, 2)))],
            ["nope"],
            "unknown output 'nope'",
        ),
        (
            [_fp32("features", np.ones((2, 4))), _int64("offset", np.ones((3, 2)))],
            None,
            "the model cannot run on these inputs",
        ),
    ],
)  # fmt: skip
def test_bad_requests_fail_alone_with_a_clear_message(
    onnx_dirs: dict[str, Path], inputs: list[TensorData], outputs: list[str] | None, message: str
) -> None:
    runner = _runner(onnx_dirs["two"])
    good = TensorRequest(
        "good", [_fp32("features", np.ones((1, 4))), _int64("offset", np.ones((1, 2)))]
    )
    bad, after = run_batch(runner, [TensorRequest("bad", inputs, outputs), good])
    assert isinstance(bad, RequestError) and bad.code == "invalid_request"
    assert message in bad.message
    assert isinstance(after, TensorResult)


def test_truncated_data_is_refused(onnx_dirs: dict[str, Path]) -> None:
    runner = _runner(onnx_dirs["mlp"])
    [bad] = run_batch(runner, [TensorRequest("r", [TensorData("x", "FP32", [1, 4], b"\0" * 12)])])
    assert isinstance(bad, RequestError) and "12 bytes" in bad.message


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounded to nearest even (finite values)."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def test_bf16_inputs_and_outputs_travel_as_bit_patterns(onnx_dirs: dict[str, Path]) -> None:
    runner = _runner(onnx_dirs["bf16"])
    assert runner.inputs == [TensorSpec("x", "BF16", [-1, 3])]
    assert [(s.name, s.datatype) for s in runner.outputs] == [("y", "BF16"), ("z", "FP32")]
    rng = np.random.default_rng(0)
    xs = [_to_bf16_bits(rng.standard_normal((n, 3)).astype(np.float32)) for n in (2, 1, 3)]
    requests = [
        TensorRequest(str(i), [TensorData("x", "BF16", list(x.shape), x.tobytes())])
        for i, x in enumerate(xs)
    ]
    results = run_batch(runner, requests, max_batch_size=8)  # merged into one call
    (graph,) = onnx_dirs["bf16"].glob("*.onnx")
    import onnx
    from onnx import numpy_helper

    (w,) = [numpy_helper.to_array(t) for t in onnx.load(str(graph)).graph.initializer]
    for result, x in zip(results, xs, strict=True):
        assert isinstance(result, TensorResult)
        y, z = result.outputs
        assert (y.datatype, y.shape, z.datatype) == ("BF16", list(x.shape), "FP32")
        expected = _from_bf16_bits(x) * w
        got_z = np.frombuffer(z.data, "<f4").reshape(x.shape)
        np.testing.assert_array_equal(got_z, expected)
        got_y = np.frombuffer(y.data, "<u2").reshape(x.shape)
        np.testing.assert_array_equal(got_y, _to_bf16_bits(expected))
    # A wrong byte count is refused like any other datatype's.
    short = TensorRequest("s", [TensorData("x", "BF16", [1, 3], b"\0" * 4)])
    [bad] = run_batch(runner, [short])
    assert isinstance(bad, RequestError) and "bytes do not fit" in bad.message
