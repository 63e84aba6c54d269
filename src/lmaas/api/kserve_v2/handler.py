"""Open Inference Protocol v2 semantics over the engine: model signatures and inference."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmaas.api.engine_calls import run_infer
from lmaas.api.kserve_v2 import text_heads
from lmaas.api.kserve_v2.encoding import OutputTensor, bf16_output_message, json_outputs
from lmaas.api.kserve_v2.image import infer_image_classification
from lmaas.api.kserve_v2.speech import infer_transcription
from lmaas.api.kserve_v2.tensor import infer_tensor
from lmaas.api.kserve_v2.tensors import InferInput, Tensor
from lmaas.api.services import ApiServices
from lmaas.api.sse import aclose_quietly
from lmaas.core.errors import DeadlineExceededError, InvalidRequestError, NotSupportedError
from lmaas.core.messages import (
    MAX_NUM_BEAMS,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    SamplingParams,
)
from lmaas.core.types import Task
from lmaas.engine.protocol import ServedModel

GENERATION_PARAMS: dict[str, str] = {
    "max_tokens": "INT32",
    "temperature": "FP32",
    "top_p": "FP32",
    "top_k": "INT32",
    "seed": "INT64",
    "min_tokens": "INT32",
    "ignore_eos": "BOOL",
}
"""Optional scalar inputs (or request ``parameters``) of generation models."""
BEAM_PARAMS: dict[str, str] = {"num_beams": "INT32", "length_penalty": "FP32"}
"""Further optional scalar inputs of seq2seq models (beam search)."""


class GenerationParams(BaseModel):
    """Decoding parameters of a v2 generation request, validated like the OpenAI ones."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """None: 1, or 0 for seq2seq models (the checkpoint's decoding, beam search included)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=1 << 20)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    min_tokens: int = Field(default=0, ge=0, le=1 << 20)
    ignore_eos: bool = False
    stop: list[str] = Field(default_factory=list, max_length=8)
    num_beams: int | None = Field(default=None, ge=1, le=MAX_NUM_BEAMS)
    length_penalty: float | None = Field(default=None, ge=-10.0, le=10.0)


def _io(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def signature(model: ServedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of the model's v2 metadata: what the loaded worker reports
    (``ModelInfo.inputs/outputs``), else the task's defaults."""
    info = model.info
    if info is not None and info.inputs is not None and info.outputs is not None:
        return (
            [_io(t.name, t.datatype, list(t.shape)) for t in info.inputs],
            [_io(t.name, t.datatype, list(t.shape)) for t in info.outputs],
        )
    if model.task is Task.EMBEDDING:
        dim = model.info.embedding_dim if model.info and model.info.embedding_dim else -1
        return [_io("text", "BYTES", [-1])], [_io("embedding", "FP32", [-1, dim])]
    if model.task.generates_text or model.task is Task.SEQ2SEQ:
        optional = [_io(name, dt, [1]) for name, dt in _scalar_params(model).items()]
        return [_io("text_input", "BYTES", [1]), *optional], [_io("text_output", "BYTES", [1])]
    return text_heads.default_signature(model) or ([], [])


def model_metadata(model: ServedModel) -> dict[str, Any]:
    inputs, outputs = signature(model)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": f"lmaas_{model.task.value}",
        "inputs": inputs,
        "outputs": outputs,
    }


def model_config(model: ServedModel) -> dict[str, Any]:
    """A minimal Triton-style model configuration."""
    inputs, outputs = signature(model)

    def triton(io: dict[str, Any]) -> dict[str, Any]:
        kind = "TYPE_STRING" if io["datatype"] == "BYTES" else f"TYPE_{io['datatype']}"
        return {"name": io["name"], "data_type": kind, "dims": io["shape"]}

    return {
        "name": model.name,
        "platform": f"lmaas_{model.task.value}",
        "backend": "lmaas",
        "max_batch_size": 0,
        "input": [triton(i) for i in inputs],
        "output": [triton(o) for o in outputs],
    }


def _check_inputs(request: InferInput, required: str, allowed: set[str]) -> Tensor:
    extra = sorted(set(request.inputs) - allowed)
    if extra:
        raise InvalidRequestError(f"unexpected input '{extra[0]}'")
    if required not in request.inputs:
        raise InvalidRequestError(f"missing input '{required}'")
    tensor = request.inputs[required]
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"input '{required}' must be BYTES, got {tensor.datatype}")
    return tensor


def _texts(tensor: Tensor) -> list[str]:
    try:
        return [v.decode("utf-8") for v in tensor.values]
    except UnicodeDecodeError:
        raise InvalidRequestError(f"input '{tensor.name}' is not valid UTF-8") from None


async def infer_embedding(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    tensor = _check_inputs(request, "text", {"text"})
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise InvalidRequestError(f"input 'text' must have shape [N] or [N, 1], got {tensor.shape}")
    if not tensor.values:
        raise InvalidRequestError("input 'text' is empty")
    embed = EmbedRequest(request_id, texts=_texts(tensor))
    result = await run_infer(services, model.ref, embed, EmbedResult)
    return [OutputTensor("embedding", "FP32", [result.num_inputs, result.dim], raw=result.data)]


def _scalar_params(model: ServedModel) -> dict[str, str]:
    if model.task is Task.SEQ2SEQ:
        return {**GENERATION_PARAMS, **BEAM_PARAMS}
    return GENERATION_PARAMS


def _sampling(request: InferInput, model: ServedModel) -> SamplingParams:
    values: dict[str, Any] = dict(request.parameters)
    for name in _scalar_params(model):
        tensor = request.inputs.get(name)
        if tensor is not None:
            if len(tensor.values) != 1:
                raise InvalidRequestError(f"input '{name}' must hold exactly one value")
            values[name] = tensor.values[0]
    try:
        params = GenerationParams.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequestError(f"invalid value for '{where}': {first['msg']}") from None
    seq2seq = model.task is Task.SEQ2SEQ
    if not seq2seq and (params.num_beams not in (None, 1) or params.length_penalty is not None):
        raise InvalidRequestError(
            "num_beams and length_penalty (beam search) are supported for seq2seq models only"
        )
    default_temperature = 0.0 if seq2seq else 1.0
    temperature = default_temperature if params.temperature is None else params.temperature
    greedy = temperature == 0.0
    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=temperature,
        top_p=1.0 if greedy else params.top_p,
        top_k=1 if greedy else max(params.top_k, 0),
        seed=params.seed,
        stop=[s for s in params.stop if s],
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        num_beams=params.num_beams,
        length_penalty=params.length_penalty,
    )


async def infer_generation(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    tensor = _check_inputs(request, "text_input", {"text_input", *_scalar_params(model)})
    if tensor.shape not in ([1], [1, 1]):
        raise InvalidRequestError(
            f"input 'text_input' must have shape [1] or [1, 1], got {tensor.shape}"
        )
    (prompt,) = _texts(tensor)
    if not prompt:
        raise InvalidRequestError("input 'text_input' is empty")
    generate = GenerateRequest(
        request_id, _sampling(request, model), prompt=prompt, add_generation_prompt=False
    )
    text = await _collect_text(services, model.ref, generate)
    return [OutputTensor("text_output", "BYTES", [1], values=[text.encode("utf-8", "replace")])]


async def _collect_text(services: ApiServices, ref: str, request: GenerateRequest) -> str:
    metrics = services.metrics
    timeout_s = services.config.request_timeout_s
    parts: list[str] = []
    num_prompt = num_generated = 0
    iterator = services.engine.generate(ref, request)
    model = ref.partition(":")[0]  # metrics are labelled by model name
    metrics.request_started(model)
    try:
        async with asyncio.timeout(timeout_s):
            async for delta in iterator:
                parts.append(delta.text)
                num_prompt += delta.prompt_tokens
                num_generated += delta.num_new_tokens
    except TimeoutError:
        raise DeadlineExceededError(
            f"the request ran past its deadline of {timeout_s:g} s"
        ) from None
    finally:
        await aclose_quietly(iterator)
        metrics.request_finished(model)
        metrics.add_tokens(model, prompt_tokens=num_prompt, generation_tokens=num_generated)
    return "".join(parts)


async def infer(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    """Run one v2 inference. Raises: InvalidRequestError, NotSupportedError, engine errors."""
    declared = {out["name"]: out["datatype"] for out in signature(model)[1]}
    for wanted in request.outputs or []:
        if wanted.name not in declared:
            raise InvalidRequestError(f"unknown output '{wanted.name}'")
    for name in json_outputs(request, list(declared)):
        if declared[name] == "BF16":  # refused before the model runs
            raise InvalidRequestError(bf16_output_message(name))
    handler = TASK_HANDLERS.get(model.task)
    if handler is None:
        raise NotSupportedError(f"v2 inference is not supported for {model.task.value} models yet")
    return await handler(services, model, request, request_id)


InferHandler = Callable[[ApiServices, ServedModel, InferInput, str], Awaitable[list[OutputTensor]]]
TASK_HANDLERS: dict[Task, InferHandler] = {
    Task.EMBEDDING: infer_embedding,
    Task.CHAT: infer_generation,
    Task.COMPLETION: infer_generation,
    Task.CLASSIFICATION: text_heads.infer_classification,
    Task.RERANK: text_heads.infer_rerank,
    Task.SPEECH_TO_TEXT: infer_transcription,
    Task.SEQ2SEQ: infer_generation,
    Task.IMAGE_CLASSIFICATION: infer_image_classification,
    Task.TENSOR: infer_tensor,
}
"""v2 inference per task; each task's module adds its handler here."""
