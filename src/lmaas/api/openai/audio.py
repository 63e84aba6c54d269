"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: OpenAI's multipart forms,
routers and response formats. A translation is Whisper's ``translate`` task (speech in any
language the model knows → English text); it has no ``language`` field, and an English-only
model answers 400.

The body cap of these routes is the audio upload cap (``max_audio_upload_bytes``, 25 MiB like
OpenAI) plus room for the other form fields, checked by the middleware on the declared length
before anything is read; the file's own size is checked again after parsing.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from lmaas.api.context import JsonResponse, request_id_of, set_model_label
from lmaas.api.engine_calls import run_infer
from lmaas.api.openai.base import check_text, logger, resolve_model
from lmaas.api.openai.subtitles import to_srt, to_vtt
from lmaas.api.services import ApiConfig, ApiServices, services_of
from lmaas.api.sse import cancel_on_disconnect
from lmaas.core.errors import InvalidRequestError, PayloadTooLargeError
from lmaas.core.messages import TranscribeRequest, TranscriptionResult
from lmaas.core.types import Task

router = APIRouter(tags=["openai"])

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
TRANSLATIONS_PATH = "/v1/audio/translations"
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FORM_OVERHEAD_BYTES = 256 * 1024
"""Room for the multipart boundaries and the text fields beside the file."""
MAX_FIELD_BYTES = 64 * 1024
"""Largest text field (the prompt is the only long one)."""
_KNOWN_FIELDS = {
    "transcribe": frozenset(
        {"file", "model", "language", "prompt", "response_format", "temperature"}
    ),
    "translate": frozenset({"file", "model", "prompt", "response_format", "temperature"}),
}
"""The form fields of each task (OpenAI's translations take no ``language``)."""
_FIELD_SCHEMAS: dict[str, dict[str, Any]] = {
    "file": {"type": "string", "format": "binary"},
    "model": {"type": "string"},
    "language": {"type": "string", "description": "ISO-639-1 code"},
    "prompt": {"type": "string"},
    "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
}


def _form_schema(task: str) -> dict[str, Any]:
    fields = [f for f in _FIELD_SCHEMAS if f in _KNOWN_FIELDS[task]]
    schema = {
        "type": "object",
        "required": ["file", "model"],
        "properties": {f: _FIELD_SCHEMAS[f] for f in fields},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


def transcription_body_cap(config: ApiConfig) -> int:
    """The body cap of the audio routes: the upload cap plus the form's overhead."""
    return config.max_audio_upload_bytes + FORM_OVERHEAD_BYTES


def audio_body_caps(config: ApiConfig) -> dict[str, int]:
    """Body cap by path of the routes that take an audio upload."""
    cap = transcription_body_cap(config)
    return {TRANSCRIPTIONS_PATH: cap, TRANSLATIONS_PATH: cap}


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a text field, not a file", param=name)
    return check_text(value, name)


def _temperature(raw: str | None) -> float:
    if raw is None or not raw.strip():
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequestError(
            f"temperature must be a number, got {raw[:32]!r}", param="temperature"
        ) from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InvalidRequestError(
            f"temperature must lie in [0, 1], got {raw[:32]}", param="temperature"
        )
    return value


async def _audio(form: FormData, max_bytes: int) -> bytes:
    upload = form.get("file")
    if upload is None:
        raise InvalidRequestError("'file' is required (a multipart form field)", param="file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError("'file' must be an uploaded file", param="file")
    if upload.size is not None and upload.size > max_bytes:
        raise PayloadTooLargeError(
            f"the audio file is larger than the limit of {max_bytes} bytes", param="file"
        )
    data = await upload.read()
    if not data:
        raise InvalidRequestError("the audio file is empty", param="file")
    return data


def _response_format(raw: str | None) -> str:
    value = (raw or "json").strip()
    if value not in RESPONSE_FORMATS:
        raise InvalidRequestError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got {value[:32]!r}",
            param="response_format",
        )
    return value


def verbose_body(
    result: TranscriptionResult, temperature: float, task: str = "transcribe"
) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: language as an ISO-639-1 code (for a translation: the
    detected spoken language; the text is English), times in seconds."""
    segments = [
        {
            "id": s.id,
            "seek": int(s.start * 100),
            "start": s.start,
            "end": s.end,
            "text": s.text,
            "temperature": temperature,
        }
        for s in result.segments
    ]
    return {
        "task": task,
        "language": result.language,
        "duration": result.duration_s,
        "text": result.text,
        "segments": segments,
        "usage": _usage(result),
    }


def _usage(result: TranscriptionResult) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(result.duration_s)}


def render(
    result: TranscriptionResult, response_format: str, temperature: float, task: str = "transcribe"
) -> Response:
    """The response in the requested format."""
    if response_format == "json":
        return JsonResponse({"text": result.text, "usage": _usage(result)})
    if response_format == "verbose_json":
        return JsonResponse(verbose_body(result, temperature, task))
    if response_format == "srt":
        return PlainTextResponse(to_srt(result.segments))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(result.segments), media_type="text/vtt")
    return PlainTextResponse(result.text + "\n")


async def _parse_form(request: Request, task: str) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequestError(
            "the body must be multipart/form-data with the audio in a 'file' field", param="file"
        )
    form = await request.form(max_files=1, max_fields=32, max_part_size=MAX_FIELD_BYTES)
    ignored = sorted(set(form.keys()) - _KNOWN_FIELDS[task])
    if ignored:
        logger.info("audio %s: ignoring unknown fields %s", task, ignored[:16])
    return form


async def _transcribe(
    services: ApiServices, model: str, request: TranscribeRequest
) -> TranscriptionResult:
    return await run_infer(services, model, request, TranscriptionResult)


@router.post(TRANSCRIPTIONS_PATH, openapi_extra=_form_schema("transcribe"))
async def create_transcription(request: Request) -> Response:
    """Transcribe an uploaded audio file (wav, mp3, flac, ogg...) in OpenAI's shape."""
    return await _speech(request, "transcribe", TRANSCRIPTIONS_PATH)


@router.post(TRANSLATIONS_PATH, openapi_extra=_form_schema("translate"))
async def create_translation(request: Request) -> Response:
    """Translate the speech of an uploaded audio file into English text, in OpenAI's shape
    (400 for an English-only Whisper)."""
    return await _speech(request, "translate", TRANSLATIONS_PATH)


async def _speech(request: Request, task: str, path: str) -> Response:
    services = services_of(request)
    form = await _parse_form(request, task)
    try:
        name = _text_field(form, "model")
        if not name:
            raise InvalidRequestError("'model' is required", param="model")
        response_format = _response_format(_text_field(form, "response_format"))
        temperature = _temperature(_text_field(form, "temperature"))
        language = (_text_field(form, "language") or None) if task == "transcribe" else None
        prompt = _text_field(form, "prompt") or None
        model = resolve_model(services.engine, name, {Task.SPEECH_TO_TEXT}, path)
        set_model_label(request.scope, model.name)
        audio = await _audio(form, services.config.max_audio_upload_bytes)
    finally:
        await form.close()
    transcribe = TranscribeRequest(
        request_id_of(request.scope),
        audio,
        language=language,
        prompt=prompt,
        temperature=temperature,
        timestamps=response_format in ("verbose_json", "srt", "vtt"),
        task=task,
    )
    work = _transcribe(services, model.ref, transcribe)
    result = await cancel_on_disconnect(request.receive, work)
    return render(result, response_format, temperature, task)
