"""Open Inference Protocol v2 tensors: parsing and validation of ``/infer`` requests.

Both encodings are read: plain JSON (``data`` flat or nested) and the binary tensor extension
(``Inference-Header-Content-Length``: a JSON header, then raw tensor bytes in input order; BYTES
elements are 4-byte little-endian length-prefixed).

``BF16`` travels only in the binary extension (2 bytes per element, the upper half of the
float32), as in Triton: JSON numbers would need a rounding rule the protocol does not give.
Its elements are kept as their 16-bit patterns (``H``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from lmaas.core.errors import InvalidRequestError

ITEM_BYTES: dict[str, int] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
    "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2, "BYTES": 0,
}  # fmt: skip
"""Every datatype of the protocol with its element size (0: variable, BYTES)."""

STRUCT_CODES: dict[str, str] = {
    "BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip
"""``struct`` format characters of the fixed-size datatypes (little-endian with ``<``)."""
BF16_BITS = "H"
"""``struct`` code of a BF16 element's bit pattern (BF16 is binary-only: not in STRUCT_CODES)."""
BF16_BINARY_ONLY = (
    "BF16 tensors travel only as binary data (the binary tensor extension, as in Triton): "
    "send the input with parameters.binary_data_size (tritonclient: set_data_from_numpy(array "
    "of ml_dtypes.bfloat16, binary_data=True))"
)
MAX_ELEMENTS = 1 << 24
MAX_DIMS = 8


@dataclass(slots=True)
class Tensor:
    """One decoded input tensor; ``values`` is flat, row-major (BYTES: ``bytes``)."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any]


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class InferInput:
    """A parsed, validated ``/infer`` request."""

    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


def _shape(raw: Any, name: str) -> list[int]:
    if not isinstance(raw, list) or len(raw) > MAX_DIMS:
        raise _bad(f"input '{name}': shape must be a list of at most {MAX_DIMS} dimensions")
    if any(type(d) is not int or d < 0 for d in raw):
        raise _bad(f"input '{name}': shape dimensions must be non-negative integers, got {raw}")
    if math.prod(raw) > MAX_ELEMENTS:
        raise _bad(f"input '{name}': shape {raw} has more than {MAX_ELEMENTS} elements")
    return list(raw)


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > MAX_DIMS:
                raise _bad(f"input '{name}': data is nested deeper than {MAX_DIMS} levels")
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()


def _check_json_values(values: list[Any], datatype: str, name: str) -> list[Any]:
    if datatype == "BF16":
        raise _bad(f"input '{name}': {BF16_BINARY_ONLY}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _bad(f"input '{name}': BYTES data must be strings")
        return [v.encode("utf-8", "surrogatepass") for v in values]
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
    elif datatype.startswith("FP"):
        ok = all(type(v) in (int, float) and math.isfinite(v) for v in values)
    else:
        ok = all(type(v) is int for v in values)
    if not ok:
        raise _bad(f"input '{name}': data does not match datatype {datatype}")
    return values


def _decode_binary(raw: bytes, datatype: str, count: int, name: str) -> list[Any]:
    if datatype == "BYTES":
        values: list[Any] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise _bad(f"input '{name}': truncated BYTES element")
            (size,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + size])
            offset += 4 + size
        if offset != len(raw):
            raise _bad(f"input '{name}': truncated BYTES element")
        return values
    if len(raw) != count * ITEM_BYTES[datatype]:
        raise _bad(f"input '{name}': {len(raw)} bytes do not fit shape and {datatype}")
    code = BF16_BITS if datatype == "BF16" else STRUCT_CODES[datatype]
    return list(struct.unpack(f"<{count}{code}", raw))


def _tensor(raw: Any, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise _bad("each input needs a 'name'")
    name = raw["name"]
    datatype = raw.get("datatype")
    if datatype not in ITEM_BYTES:
        raise _bad(f"input '{name}': unknown datatype {datatype!r}")
    shape = _shape(raw.get("shape"), name)
    count = math.prod(shape)
    params = raw.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise _bad(f"input '{name}': binary_data_size {size!r} does not fit the body")
        values = _decode_binary(binary[offset : offset + size], datatype, count, name)
        offset += size
    elif "data" in raw:
        values = _check_json_values(_flatten(raw["data"], name), datatype, name)
    else:
        raise _bad(f"input '{name}' has no data")
    if len(values) != count:
        raise _bad(f"input '{name}': {len(values)} elements do not match shape {shape}")
    return Tensor(name, datatype, shape, values), offset


def _outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad("'outputs' must be a list")
    found: list[RequestedOutput] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad("each requested output needs a 'name'")
        if any(o.name == item["name"] for o in found):
            raise _bad(f"output '{item['name']}' is requested twice")
        params = item.get("parameters") or {}
        found.append(RequestedOutput(item["name"], bool(params.get("binary_data", False))))
    return found


def parse_infer(body: bytes, header_length: str | None) -> InferInput:
    """Decode and validate an ``/infer`` body. Raises: InvalidRequestError."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad("invalid Inference-Header-Content-Length")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"malformed JSON body: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("the request needs a non-empty 'inputs' list")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for raw in doc["inputs"]:
        tensor, offset = _tensor(raw, binary, offset)
        if tensor.name in inputs:
            raise _bad(f"input '{tensor.name}' is given twice")
        inputs[tensor.name] = tensor
    raw_params = doc.get("parameters")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    request_id = doc.get("id")
    return InferInput(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        outputs=_outputs(doc.get("outputs")),
        parameters=params,
        binary_output=bool(params.get("binary_data_output", False)),
    )
