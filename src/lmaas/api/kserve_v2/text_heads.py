"""v2 inference for text classifiers and cross-encoder rerankers.

* ``classification``: input ``text`` BYTES ``[N]`` or ``[N, 1]`` → ``probabilities`` FP32
  ``[N, C]`` (label order of the metadata) and ``label`` BYTES ``[N]`` (the top class).
* ``rerank``: inputs ``query`` BYTES ``[1]`` and ``documents`` BYTES ``[N]`` (or ``[N, 1]``) →
  ``scores`` FP32 ``[N]``, in document order.

Requested outputs are picked by the router; these handlers build every output of the task.
"""

from __future__ import annotations

import struct
from typing import Any

from lmaas.api.engine_calls import run_infer
from lmaas.api.kserve_v2.encoding import OutputTensor
from lmaas.api.kserve_v2.tensors import InferInput, Tensor
from lmaas.api.services import ApiServices
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import ClassifyRequest, ClassifyResult, RerankRequest, ScoreResult
from lmaas.core.types import Task
from lmaas.engine.protocol import ServedModel


def _io(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def default_signature(
    model: ServedModel,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The task's inputs and outputs before the worker reported its own (None: not our task)."""
    if model.task is Task.CLASSIFICATION:
        labels = model.info.labels if model.info is not None else None
        num = len(labels) if labels else -1
        outputs = [_io("probabilities", "FP32", [-1, num]), _io("label", "BYTES", [-1])]
        return [_io("text", "BYTES", [-1])], outputs
    if model.task is Task.RERANK:
        inputs = [_io("query", "BYTES", [1]), _io("documents", "BYTES", [-1])]
        return inputs, [_io("scores", "FP32", [-1])]
    return None


def _bytes_input(request: InferInput, name: str) -> Tensor:
    tensor = request.inputs.get(name)
    if tensor is None:
        raise InvalidRequestError(f"missing input '{name}'")
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"input '{name}' must be BYTES, got {tensor.datatype}")
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidRequestError(f"input '{name}' must have shape [N] or [N, 1], got {shape}")
    if not tensor.values:
        raise InvalidRequestError(f"input '{name}' is empty")
    return tensor


def _strings(tensor: Tensor) -> list[str]:
    try:
        texts = [value.decode("utf-8") for value in tensor.values]
    except UnicodeDecodeError:
        raise InvalidRequestError(f"input '{tensor.name}' is not valid UTF-8") from None
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequestError(f"input '{tensor.name}' element {i} is empty")
    return texts


def _only(request: InferInput, allowed: set[str]) -> None:
    extra = sorted(set(request.inputs) - allowed)
    if extra:
        raise InvalidRequestError(f"unexpected input '{extra[0]}'")


async def infer_classification(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    _only(request, {"text"})
    texts = _strings(_bytes_input(request, "text"))
    result = await run_infer(
        services, model.ref, ClassifyRequest(request_id, texts=texts), ClassifyResult
    )
    num = result.num_labels
    known = model.info.labels if model.info is not None else None
    labels = known if known and len(known) == num else [f"LABEL_{i}" for i in range(num)]
    probs = struct.unpack(f"<{result.num_inputs * num}f", result.probs)
    rows = [probs[i * num : (i + 1) * num] for i in range(result.num_inputs)]
    top = [max(range(num), key=row.__getitem__) for row in rows]
    return [
        OutputTensor("probabilities", "FP32", [result.num_inputs, num], raw=result.probs),
        OutputTensor(
            "label", "BYTES", [result.num_inputs], values=[labels[c].encode() for c in top]
        ),
    ]


async def infer_rerank(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    _only(request, {"query", "documents"})
    query = _bytes_input(request, "query")
    if len(query.values) != 1:
        raise InvalidRequestError(f"input 'query' must hold one string, got {len(query.values)}")
    [query_text] = _strings(query)
    documents = _strings(_bytes_input(request, "documents"))
    if len(documents) > services.config.max_rerank_documents:
        raise InvalidRequestError(
            f"input 'documents' has {len(documents)} elements; "
            f"at most {services.config.max_rerank_documents} are allowed"
        )
    rerank = RerankRequest(request_id, query_text, documents)
    result = await run_infer(services, model.ref, rerank, ScoreResult)
    return [OutputTensor("scores", "FP32", [len(result.scores)], values=result.scores)]
