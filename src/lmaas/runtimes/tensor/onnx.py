"""Any ONNX graph served on named tensors (the generic Open Inference Protocol v2 path).

The worker reads the graph's own signature (names, element types, shapes with dynamic axes as
``-1``) and reports it as ``ModelInfo.inputs/outputs``, so ``/v2/models/{m}`` shows the real
thing, and every request is checked against it before it reaches onnxruntime: an unknown or
missing input, a wrong datatype, a wrong rank or a fixed dimension that does not match is an
``InvalidRequestError`` naming the input (400), and the worker stays up.

Each request is one row of the worker's dynamic batcher. When every input's first axis is
dynamic, ``forward`` concatenates requests whose other dimensions agree along that axis and runs
them as one call (splitting the outputs back by each request's batch size); otherwise, or when
the outputs do not come back batch-major, requests run one by one.

``BF16`` tensors (numpy has no bfloat16) are carried as their 16-bit patterns in ``uint16``
arrays: fed to onnxruntime as ``OrtValue`` s typed bfloat16, and read back byte for byte.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from lmaas.core.errors import (
    InternalError,
    InvalidRequestError,
    LmaasError,
    ModelLoadError,
    NotSupportedError,
)
from lmaas.core.messages import (
    InferRequest,
    ModelInfo,
    TensorData,
    TensorRequest,
    TensorResult,
    TensorSpec,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared
from lmaas.runtimes.onnx_session import ORT_TO_V2, open_session, worker_threads

_log = logging.getLogger(__name__)

_NUMPY_DTYPES: dict[str, str] = {
    "FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
    "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "BOOL": "?", "BF16": "<u2",
}  # fmt: skip
"""v2 datatypes whose data is a little-endian numpy buffer (BYTES is handled apart; BF16 as
its bit patterns)."""
_ONNX_BFLOAT16 = 16
"""``onnx.TensorProto.BFLOAT16``."""

Array = npt.NDArray[Any]
# ONNX Runtime's errors for inputs the graph cannot take (shapes that disagree inside it).
_ORT_INPUT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("InvalidArgument", "Fail", "RuntimeException")
)


@dataclass(frozen=True, slots=True)
class TensorRow:
    """One request's inputs as arrays, and the outputs it wants."""

    feeds: dict[str, Array]
    outputs: tuple[str, ...]
    batch: int
    """First-axis size shared by every input, or -1 when they differ (runs alone)."""


class OnnxTensorRunner:
    """Runs an ONNX graph on v2 tensors; implements :class:`~lmaas.runtimes.base.BatchRunner`.

    Args:
        spec: The worker spec: ``model_dir`` holds one ``.onnx`` file; option ``num_threads``
            (intra-op threads; default: the worker's cores).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._session: ort.InferenceSession | None = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._batchable = False
        self._bf16 = False
        """A BF16 input or output: run on OrtValues (numpy cannot hold bfloat16)."""

    def load(self) -> ModelInfo:
        """Open the graph and read its signature. Raises: ModelLoadError."""
        graph = _find_graph(Path(self._spec.model_dir))
        self._session = open_session(graph, worker_threads(self._spec.options))
        self.inputs = [_spec_of(arg) for arg in self._session.get_inputs()]
        self.outputs = [_spec_of(arg) for arg in self._session.get_outputs()]
        self._batchable = all(s.shape and s.shape[0] == -1 for s in self.inputs + self.outputs)
        self._bf16 = any(s.datatype == "BF16" for s in self.inputs + self.outputs)
        _log.info("loaded %s: inputs %s, outputs %s", graph.name, self.inputs, self.outputs)
        return ModelInfo(
            context_length=0,
            dtype=_main_dtype(self.inputs),
            device="cpu",
            inputs=self.inputs,
            outputs=self.outputs,
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Nothing to do: a generic graph has no safe example input to run."""

    def health(self) -> bool:
        return self._session is not None

    def accepts(self) -> tuple[type, ...]:
        return (TensorRequest,)

    def preprocess(self, request: InferRequest) -> Prepared:
        """Check the request against the graph and decode its tensors. Raises:
        InvalidRequestError naming the offending input or output."""
        if not isinstance(request, TensorRequest):
            raise InvalidRequestError("this model only runs tensor requests")
        given = {t.name: t for t in request.inputs}
        if len(given) != len(request.inputs):
            raise InvalidRequestError("an input is given twice")
        expected = {s.name: s for s in self.inputs}
        unknown = sorted(given.keys() - expected.keys())
        if unknown:
            raise InvalidRequestError(
                f"unknown input '{unknown[0]}'; the model takes {', '.join(expected)}"
            )
        missing = [name for name in expected if name not in given]
        if missing:
            raise InvalidRequestError(f"missing input '{missing[0]}'")
        feeds = {name: _decode(given[name], spec) for name, spec in expected.items()}
        outputs = self._requested_outputs(request.outputs)
        sizes = {a.shape[0] if a.ndim else -1 for a in feeds.values()}
        batch = sizes.pop() if len(sizes) == 1 and self._batchable else -1
        row = TensorRow(feeds, outputs, batch)
        return Prepared(request.request_id, [(max(batch, 1), row)], request)

    def forward(self, payloads: list[TensorRow]) -> list[list[Array] | LmaasError]:
        """One output list per row; rows whose shapes agree share one call."""
        if self._session is None:
            raise InternalError("the model is not loaded")
        results: list[list[Array] | LmaasError | None] = [None] * len(payloads)
        for group in _groups(payloads):
            rows = [payloads[i] for i in group]
            merged = self._run_merged(rows) if len(rows) > 1 else None
            if merged is None:
                for i in group:
                    results[i] = self._run_one(payloads[i])
            else:
                for i, outputs in zip(group, merged, strict=True):
                    results[i] = outputs
        return [r if r is not None else InternalError("row was not run") for r in results]

    def postprocess(self, prepared: Prepared) -> TensorResult:
        (output,) = prepared.outputs
        if isinstance(output, LmaasError):
            raise output
        row: TensorRow = prepared.rows[0][1]
        by_name = {s.name: s for s in self.outputs}
        tensors = [
            _encode(name, by_name[name].datatype, array)
            for name, array in zip(row.outputs, output, strict=True)
        ]
        return TensorResult(request_id=prepared.request_id, outputs=tensors)

    # ------------------------------------------------------------------ helpers

    def _requested_outputs(self, names: list[str] | None) -> tuple[str, ...]:
        known = [s.name for s in self.outputs]
        if names is None:
            return tuple(known)
        for name in names:
            if name not in known:
                raise InvalidRequestError(
                    f"unknown output '{name}'; the model returns {', '.join(known)}"
                )
        if len(set(names)) != len(names):
            raise InvalidRequestError("an output is requested twice")
        return tuple(names)

    def _run(self, feeds: dict[str, Array], outputs: Sequence[str]) -> list[Array]:
        assert self._session is not None  # checked by forward()
        if not self._bf16:
            return [np.asarray(a) for a in self._session.run(list(outputs), feeds)]
        kinds = {s.name: s.datatype for s in self.inputs}
        values = {
            name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array), onnx_element_type=_ONNX_BFLOAT16
            )
            if kinds[name] == "BF16"
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            for name, array in feeds.items()
        }
        found = self._session.run_with_ort_values(list(outputs), values)
        return [_ort_to_numpy(value) for value in found]

    def _run_one(self, row: TensorRow) -> list[Array] | LmaasError:
        try:
            return self._run(row.feeds, row.outputs)
        except _ORT_INPUT_ERRORS as exc:
            first_line = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
            return InvalidRequestError(f"the model cannot run on these inputs: {first_line}")

    def _run_merged(self, rows: list[TensorRow]) -> list[list[Array]] | None:
        """Run rows as one batch; None when the graph refuses it or answers not batch-major."""
        wanted = tuple(dict.fromkeys(name for row in rows for name in row.outputs))
        feeds = {
            name: np.concatenate([row.feeds[name] for row in rows], axis=0)
            for name in rows[0].feeds
        }
        try:
            merged = self._run(feeds, wanted)
        except _ORT_INPUT_ERRORS:
            return None
        total = sum(row.batch for row in rows)
        if any(not a.ndim or a.shape[0] != total for a in merged):
            return None
        by_name = dict(zip(wanted, merged, strict=True))
        split: list[list[Array]] = []
        start = 0
        for row in rows:
            end = start + row.batch
            split.append([by_name[name][start:end] for name in row.outputs])
            start = end
        return split


def _ort_to_numpy(value: ort.OrtValue) -> Array:
    """A CPU OrtValue as an array; bfloat16 as its bit patterns (``uint16``), copied."""
    if value.data_type() != "tensor(bfloat16)":
        return np.asarray(value.numpy())
    shape = tuple(value.shape())
    size = 2 * int(np.prod(shape, dtype=np.int64))
    raw = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(raw, dtype="<u2").reshape(shape)


def _groups(rows: list[TensorRow]) -> list[list[int]]:
    """Indices of rows that may be concatenated (same dtypes and trailing shapes)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    alone: list[list[int]] = []
    for i, row in enumerate(rows):
        if row.batch < 1:
            alone.append([i])
            continue
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(row.feeds.items()))
        groups.setdefault(key, []).append(i)
    return [*groups.values(), *alone]


def _find_graph(model_dir: Path) -> Path:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    graphs = sorted(model_dir.glob("*.onnx"))
    if len(graphs) != 1:
        found = ", ".join(g.name for g in graphs) or "none"
        raise ModelLoadError(f"{model_dir.name} must hold exactly one .onnx graph (found {found})")
    return graphs[0]


def _spec_of(arg: Any) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"'{arg.name}' has type {arg.type}, which v2 cannot carry")
    shape = arg.shape if isinstance(arg.shape, list) else []
    return TensorSpec(
        arg.name, datatype, [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    )


def _main_dtype(inputs: list[TensorSpec]) -> str:
    kinds = {s.datatype for s in inputs}
    return kinds.pop().lower() if len(kinds) == 1 else "mixed"


def _decode(tensor: TensorData, spec: TensorSpec) -> Array:
    name = tensor.name
    if tensor.datatype != spec.datatype:
        raise InvalidRequestError(
            f"input '{name}' must be {spec.datatype}, got {tensor.datatype}", param=name
        )
    if len(tensor.shape) != len(spec.shape):
        raise InvalidRequestError(
            f"input '{name}' must have {len(spec.shape)} dimensions {spec.shape}, "
            f"got {tensor.shape}",
            param=name,
        )
    for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
        if want != -1 and want != got:
            raise InvalidRequestError(
                f"input '{name}' has shape {tensor.shape}; dimension {axis} must be {want} "
                f"(model shape {spec.shape})",
                param=name,
            )
    count = int(np.prod(tensor.shape, dtype=np.int64))
    if spec.datatype == "BYTES":
        items = tensor.items or []
        if len(items) != count:
            raise InvalidRequestError(f"input '{name}': {len(items)} elements for {tensor.shape}")
        values = [item.decode("utf-8", "replace") for item in items]
        return np.array(values, dtype=object).reshape(tensor.shape)
    dtype = _NUMPY_DTYPES.get(spec.datatype)
    if dtype is None:
        raise NotSupportedError(f"input '{name}' is {spec.datatype}, which lmaas cannot feed yet")
    if len(tensor.data) != count * np.dtype(dtype).itemsize:
        raise InvalidRequestError(
            f"input '{name}': {len(tensor.data)} bytes do not fit shape {tensor.shape}",
            param=name,
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _encode(name: str, datatype: str, array: Array) -> TensorData:
    shape = [int(d) for d in array.shape]
    if datatype == "BYTES":
        items = [str(v).encode("utf-8") if not isinstance(v, bytes) else v for v in array.flat]
        return TensorData(name, datatype, shape, items=items)
    dtype = _NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise NotSupportedError(f"output '{name}' is {datatype}, which lmaas cannot return yet")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return TensorData(name, datatype, shape, data=data)
