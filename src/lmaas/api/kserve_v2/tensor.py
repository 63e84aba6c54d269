"""v2 inference for ``tensor`` models: v2 tensors ↔ the engine's :class:`TensorData`.

The gateway only re-packs tensors: the worker checks names, datatypes and shapes against the
graph (it knows the graph; the gateway does not load it) and answers 400 naming the input.
"""

from __future__ import annotations

import struct

from lmaas.api.engine_calls import run_infer
from lmaas.api.kserve_v2.encoding import OutputTensor
from lmaas.api.kserve_v2.tensors import BF16_BITS, STRUCT_CODES, InferInput, Tensor
from lmaas.api.services import ApiServices
from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.core.messages import TensorData, TensorRequest, TensorResult
from lmaas.engine.protocol import ServedModel


def to_tensor_data(tensor: Tensor) -> TensorData:
    """Pack one parsed input little-endian. Raises: InvalidRequestError for out-of-range values."""
    if tensor.datatype == "BYTES":
        return TensorData(tensor.name, "BYTES", tensor.shape, items=list(tensor.values))
    code = BF16_BITS if tensor.datatype == "BF16" else STRUCT_CODES.get(tensor.datatype)
    if code is None:
        raise NotSupportedError(f"input '{tensor.name}': {tensor.datatype} is not supported yet")
    try:
        data = struct.pack(f"<{len(tensor.values)}{code}", *tensor.values)
    except (struct.error, OverflowError) as exc:
        raise InvalidRequestError(
            f"input '{tensor.name}': a value does not fit {tensor.datatype} ({exc})"
        ) from None
    return TensorData(tensor.name, tensor.datatype, tensor.shape, data=data)


def to_output(tensor: TensorData) -> OutputTensor:
    if tensor.datatype == "BYTES":
        return OutputTensor(tensor.name, "BYTES", tensor.shape, values=list(tensor.items or []))
    return OutputTensor(tensor.name, tensor.datatype, tensor.shape, raw=tensor.data)


async def infer_tensor(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    """Run the graph on the request's tensors; only the requested outputs are computed."""
    inputs = [to_tensor_data(t) for t in request.inputs.values()]
    wanted = [o.name for o in request.outputs] if request.outputs is not None else None
    message = TensorRequest(request_id, inputs, wanted)
    result = await run_infer(services, model.ref, message, TensorResult)
    return [to_output(t) for t in result.outputs]
