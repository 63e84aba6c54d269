"""Open Inference Protocol v2 inference for speech-to-text models.

Input ``audio``: BYTES, shape ``[1]`` (or ``[1, 1]``), one encoded audio file (send it with the
binary tensor extension; a JSON string is taken as its UTF-8 bytes). Optional request
``parameters``: ``language``, ``prompt``, ``temperature``, ``task`` (``transcribe``, the default, or
``translate``: English text, as ``/v1/audio/translations``). Output ``text``: BYTES ``[1]``.
"""

from __future__ import annotations

from typing import Any

from lmaas.api.engine_calls import run_infer
from lmaas.api.kserve_v2.encoding import OutputTensor
from lmaas.api.kserve_v2.tensors import InferInput
from lmaas.api.services import ApiServices
from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import TranscribeRequest, TranscriptionResult
from lmaas.engine.protocol import ServedModel


def _parameter(parameters: dict[str, Any], name: str, kind: type) -> Any:
    value = parameters.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRequestError(f"parameter '{name}' must be a {kind.__name__}")
    return value


async def infer_transcription(
    services: ApiServices, model: ServedModel, request: InferInput, request_id: str
) -> list[OutputTensor]:
    """Transcribe the one audio file of input ``audio``. Raises: InvalidRequestError."""
    extra = sorted(set(request.inputs) - {"audio"})
    if extra:
        raise InvalidRequestError(f"unexpected input '{extra[0]}'")
    tensor = request.inputs.get("audio")
    if tensor is None:
        raise InvalidRequestError("missing input 'audio'")
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"input 'audio' must be BYTES, got {tensor.datatype}")
    if tensor.shape not in ([1], [1, 1]) or len(tensor.values) != 1:
        raise InvalidRequestError(
            f"input 'audio' must have shape [1] or [1, 1], got {tensor.shape}"
        )
    temperature = _parameter(request.parameters, "temperature", float)
    if temperature is not None and not 0.0 <= temperature <= 1.0:
        raise InvalidRequestError(f"parameter 'temperature' must lie in [0, 1], got {temperature}")
    task = _parameter(request.parameters, "task", str) or "transcribe"
    if task not in ("transcribe", "translate"):
        raise InvalidRequestError(
            f"parameter 'task' must be 'transcribe' or 'translate', got {task[:32]!r}"
        )
    transcribe = TranscribeRequest(
        request_id,
        bytes(tensor.values[0]),
        language=_parameter(request.parameters, "language", str),
        prompt=_parameter(request.parameters, "prompt", str),
        temperature=temperature or 0.0,
        timestamps=False,
        task=task,
    )
    result = await run_infer(services, model.ref, transcribe, TranscriptionResult)
    return [OutputTensor("text", "BYTES", [1], values=[result.text.encode("utf-8")])]
