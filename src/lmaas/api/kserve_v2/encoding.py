"""Open Inference Protocol v2 responses, in JSON or with the binary tensor extension."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from lmaas.api.context import json_bytes
from lmaas.api.kserve_v2.tensors import BF16_BITS, STRUCT_CODES, InferInput
from lmaas.core.errors import InvalidRequestError

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(slots=True)
class OutputTensor:
    """One output: numeric datatypes carry numbers (or their little-endian bytes), BYTES
    carries bytes."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any] | None = None
    raw: bytes | None = None
    """Data already packed little-endian in ``datatype`` (as the engine returns embeddings)."""

    def to_binary(self) -> bytes:
        if self.raw is not None:
            return self.raw
        values = self.values or []
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(v)) + v for v in values)
        code = BF16_BITS if self.datatype == "BF16" else STRUCT_CODES[self.datatype]
        return struct.pack(f"<{len(values)}{code}", *values)

    def to_json(self) -> list[Any]:
        if self.datatype == "BF16":
            raise InvalidRequestError(bf16_output_message(self.name))
        if self.datatype == "BYTES":
            return [v.decode("utf-8", "replace") for v in self.values or []]
        if self.raw is not None:
            code = STRUCT_CODES[self.datatype]
            return list(struct.unpack(f"<{len(self.raw) // struct.calcsize(code)}{code}", self.raw))
        return list(self.values or [])


def bf16_output_message(name: str) -> str:
    return (
        f"output '{name}' is BF16, which travels only as binary data (as in Triton): request "
        'it with "parameters": {"binary_data": true} (or the request\'s "binary_data_output")'
    )


def json_outputs(request: InferInput, available: list[str]) -> list[str]:
    """The names among ``available`` (the model's outputs) that would be sent as JSON."""
    if request.outputs is None:
        return [] if request.binary_output else list(available)
    return [o.name for o in request.outputs if not (o.binary or request.binary_output)]


def select_outputs(
    request: InferInput, available: list[OutputTensor]
) -> list[tuple[OutputTensor, bool]]:
    """The outputs to send, each with whether it goes binary. Raises: for unknown names."""
    if request.outputs is None:
        return [(out, request.binary_output) for out in available]
    by_name = {out.name: out for out in available}
    chosen: list[tuple[OutputTensor, bool]] = []
    for wanted in request.outputs:
        if wanted.name not in by_name:
            raise InvalidRequestError(f"unknown output '{wanted.name}'")
        chosen.append((by_name[wanted.name], wanted.binary or request.binary_output))
    return chosen


def encode_response(
    header: dict[str, Any], outputs: list[tuple[OutputTensor, bool]]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` if binary)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out, binary in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary:
            blob = out.to_binary()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.to_json()
        entries.append(entry)
    head = json_bytes({**header, "outputs": entries})
    if not blobs:
        return head, {"Content-Type": "application/json"}
    extra = {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return head + b"".join(blobs), extra
