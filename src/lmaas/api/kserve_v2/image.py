"""v2 inference for image-classification models.

Inputs (exactly one):

* ``image`` BYTES ``[N]`` (or ``[N, 1]``): encoded images (PNG, JPEG, ...). With the binary
  tensor extension each element is the file itself; in plain JSON, where BYTES elements are
  strings, each element is the file in base64 (a ``data:image/...;base64,`` prefix is allowed),
  as KServe's image examples send it.
* ``pixel_values`` FP32 ``[N, 3, H, W]``: already preprocessed pixels, of the size the model's
  processor produces (``/v2/models/{m}`` lists it).

Outputs: ``probabilities`` FP32 ``[N, C]`` (softmax, in label order) and ``label`` BYTES ``[N]``
(the most probable label of each input).
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array

from lmaas.api.engine_calls import run_infer
from lmaas.api.kserve_v2.encoding import OutputTensor
from lmaas.api.kserve_v2.tensors import InferInput, Tensor
from lmaas.api.services import ApiServices
from lmaas.core.errors import InternalError, InvalidRequestError
from lmaas.core.messages import ClassifyRequest, ClassifyResult, TensorData
from lmaas.engine.protocol import ServedModel

IMAGE_INPUTS = ("image", "pixel_values")


def _one_input(request: InferInput) -> Tensor:
    extra = sorted(set(request.inputs) - set(IMAGE_INPUTS))
    if extra:
        raise InvalidRequestError(
            f"unexpected input '{extra[0]}'; give 'image' (BYTES) or 'pixel_values' (FP32)"
        )
    if len(request.inputs) != 1:
        raise InvalidRequestError("give exactly one of the inputs 'image' and 'pixel_values'")
    return next(iter(request.inputs.values()))


def _encoded_image(value: bytes) -> bytes:
    """The file itself: base64 text (JSON requests) is decoded, raw bytes pass through."""
    text = value.strip()
    if text.startswith(b"data:"):
        header, _, text = text.partition(b",")
        if not header.endswith(b";base64"):
            raise InvalidRequestError("input 'image': data URLs must be base64-encoded")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # No image format is pure base64 text: these are the encoded file's own bytes.
        return value


def _image_request(tensor: Tensor, request_id: str) -> ClassifyRequest:
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"input 'image' must be BYTES, got {tensor.datatype}")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise InvalidRequestError(
            f"input 'image' must have shape [N] or [N, 1], got {tensor.shape}"
        )
    if not tensor.values:
        raise InvalidRequestError("input 'image' is empty")
    return ClassifyRequest(request_id, images=[_encoded_image(v) for v in tensor.values])


def _pixel_request(tensor: Tensor, request_id: str) -> ClassifyRequest:
    if tensor.datatype != "FP32":
        raise InvalidRequestError(f"input 'pixel_values' must be FP32, got {tensor.datatype}")
    if len(tensor.shape) != 4 or tensor.shape[0] == 0:
        raise InvalidRequestError(
            f"input 'pixel_values' must have shape [N, 3, H, W], got {tensor.shape}"
        )
    packed = array("f", tensor.values)
    if sys.byteorder != "little":
        packed.byteswap()
    data = TensorData("pixel_values", "FP32", list(tensor.shape), packed.tobytes())
    return ClassifyRequest(request_id, pixel_values=data)


def _labels(model: ServedModel, probs: array[float], num_inputs: int, width: int) -> list[bytes]:
    names = (model.info.labels if model.info else None) or []
    labels: list[bytes] = []
    for row in range(num_inputs):
        scores = probs[row * width : (row + 1) * width]
        best = max(range(width), key=scores.__getitem__)
        name = names[best] if best < len(names) else str(best)
        labels.append(name.encode("utf-8"))
    return labels


async def infer_image_classification(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    """Classify encoded images or a pixel tensor. Raises: InvalidRequestError, engine errors."""
    tensor = _one_input(request)
    if tensor.name == "image":
        classify = _image_request(tensor, request_id)
    else:
        classify = _pixel_request(tensor, request_id)
    result = await run_infer(services, model.ref, classify, ClassifyResult)
    n, width = result.num_inputs, result.num_labels
    if len(result.probs) != 4 * n * width or width == 0:
        raise InternalError("the worker returned probabilities of the wrong size")
    probs = array("f")
    probs.frombytes(result.probs)
    if sys.byteorder != "little":
        probs.byteswap()
    return [
        OutputTensor("probabilities", "FP32", [n, width], raw=result.probs),
        OutputTensor("label", "BYTES", [n], values=_labels(model, probs, n, width)),
    ]
