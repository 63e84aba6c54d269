"""What the Whisper runtimes share: serving options, request checks and result assembly."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lmaas.core.errors import InvalidRequestError, ModelLoadError
from lmaas.core.messages import (
    InferRequest,
    Segment,
    TensorSpec,
    TranscribeRequest,
    TranscriptionResult,
)
from lmaas.runtimes.speech.audio import decode_audio

WHISPER_CONTEXT = 448
"""Decoder positions of every Whisper model (the text of one 30 s window must fit)."""

SPEECH_INPUTS = [TensorSpec("audio", "BYTES", [1])]
"""v2 metadata: one encoded audio file in, one transcript out."""
SPEECH_OUTPUTS = [TensorSpec("text", "BYTES", [1])]

MAX_PROMPT_CHARS = 4096
"""A Whisper prompt uses at most half of the 448-token context; longer text is cut anyway."""

_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}$")


@dataclass(frozen=True, slots=True)
class SpeechOptions:
    """Serving options of a speech model (manifest ``serving.options``)."""

    max_audio_s: float = 1800.0
    """Longest audio accepted; longer files get 413 while they are decoded."""
    beam_size: int = 5
    """Beam width of the CTranslate2 runtime at temperature 0 (1: greedy)."""
    compute_type: str = "default"
    """CTranslate2 compute type (``default`` keeps the stored type; ``int8``, ``float32``...)."""
    max_new_tokens: int = WHISPER_CONTEXT // 2
    """Most tokens generated per 30 s window (the transformers runtime)."""


def speech_options(options: Mapping[str, str]) -> SpeechOptions:
    """Parse the speech serving options. Raises: ModelLoadError for a bad value."""
    try:
        parsed = SpeechOptions(
            max_audio_s=float(options.get("max_audio_s", "1800")),
            beam_size=int(options.get("beam_size", "5")),
            compute_type=options.get("compute_type", "default"),
            max_new_tokens=int(options.get("max_new_tokens", str(WHISPER_CONTEXT // 2))),
        )
    except ValueError as exc:
        raise ModelLoadError(f"invalid speech serving option: {exc}") from exc
    if not 0 < parsed.max_audio_s <= 24 * 3600:
        raise ModelLoadError(f"max_audio_s={parsed.max_audio_s:g} must lie in (0, 86400]")
    if not 1 <= parsed.beam_size <= 16:
        raise ModelLoadError(f"beam_size={parsed.beam_size} must lie in 1..16")
    if not 1 <= parsed.max_new_tokens <= WHISPER_CONTEXT:
        raise ModelLoadError(f"max_new_tokens={parsed.max_new_tokens} must lie in 1..448")
    return parsed


TASKS = ("transcribe", "translate")


def check_request(request: TranscribeRequest, languages: frozenset[str] | None) -> str | None:
    """Validate the decoding parameters; return the language to use (None: detect it).

    Args:
        request: The request.
        languages: The codes the model knows; None for an English-only model.

    Raises:
        InvalidRequestError: temperature outside [0, 1], an unknown language, a prompt too long,
            an unknown task, a translation asked of an English-only model.
    """
    if request.task not in TASKS:
        raise InvalidRequestError(f"unknown speech task {request.task[:32]!r}", param="task")
    if request.task == "translate" and languages is None:
        raise InvalidRequestError(
            "this model is an English-only Whisper (a '.en' checkpoint): it cannot translate; "
            "serve a multilingual Whisper for /v1/audio/translations",
            param="model",
        )
    if not 0.0 <= request.temperature <= 1.0 or math.isnan(request.temperature):
        raise InvalidRequestError(
            f"temperature must lie in [0, 1], got {request.temperature}", param="temperature"
        )
    if request.prompt is not None and len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt"
        )
    language = request.language.strip().lower() if request.language else None
    if not language:
        return "en" if languages is None else None
    if languages is None:
        if language != "en":
            raise InvalidRequestError(
                f"this model transcribes English only; language {language!r} is not supported",
                param="language",
            )
        return language
    if not _LANGUAGE_RE.fullmatch(language) or language not in languages:
        raise InvalidRequestError(
            f"language {language!r} is not one this model knows (ISO-639-1 codes such as "
            f"{', '.join(sorted(languages)[:5])})",
            param="language",
        )
    return language


def build_result(
    request_id: str, language: str, duration_s: float, segments: list[tuple[float, float, str]]
) -> TranscriptionResult:
    """The result from ``(start_s, end_s, text)`` segments; times are clamped to the audio."""
    out: list[Segment] = []
    for start, end, text in segments:
        if not text.strip():
            continue
        start = min(max(0.0, start), duration_s)
        end = min(max(start, end), duration_s)
        out.append(Segment(len(out), round(start, 3), round(end, 3), text))
    full = "".join(s.text for s in out).strip()
    return TranscriptionResult(request_id, full, language, round(duration_s, 3), out)


def checked_audio(
    request: InferRequest, languages: frozenset[str] | None, max_audio_s: float
) -> tuple[TranscribeRequest, str | None, npt.NDArray[np.float32]]:
    """What every Whisper runner's ``preprocess`` starts with: the request checked, the language
    to use (None: detect it) and the audio decoded to 16 kHz mono.

    Raises:
        InvalidRequestError: not a transcription, bad parameters or undecodable audio.
        PayloadTooLargeError: audio longer than ``max_audio_s``.
    """
    if not isinstance(request, TranscribeRequest):
        raise InvalidRequestError("this model only transcribes audio")
    language = check_request(request, languages)
    return request, language, decode_audio(request.audio, max_audio_s)
