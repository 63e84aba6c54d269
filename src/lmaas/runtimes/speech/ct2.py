"""Whisper on CTranslate2 through faster-whisper (format ``ct2``)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from lmaas.core.errors import InternalError, ModelLoadError
from lmaas.core.messages import (
    InferRequest,
    ModelInfo,
    TranscribeRequest,
    TranscriptionResult,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.speech.audio import SAMPLE_RATE, silence_wav
from lmaas.runtimes.speech.common import (
    SPEECH_INPUTS,
    SPEECH_OUTPUTS,
    WHISPER_CONTEXT,
    build_result,
    checked_audio,
    speech_options,
)

_log = logging.getLogger(__name__)

FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""At temperature 0, decoding falls back to these when the text looks wrong (OpenAI's rule:
"the model will use log probability to automatically increase the temperature")."""


class CT2WhisperRunner:
    """Transcribes audio with a CTranslate2 Whisper conversion (``faster-whisper``).

    Implements :class:`lmaas.runtimes.base.BatchRunner` with one row per request: ``preprocess``
    decodes the audio on a helper thread, ``forward`` runs faster-whisper's own long-form
    algorithm (30 s windows, seek on timestamps, conditioning on the previous text, temperature
    fallback) on each audio of the batch in turn. Row length is the duration in seconds, so the
    batcher's token budget caps the audio seconds of one batch.

    Args:
        spec: The worker spec; options ``max_audio_s``, ``beam_size``, ``compute_type``,
            ``num_threads`` (see :class:`~lmaas.runtimes.speech.common.SpeechOptions`).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._options = speech_options(spec.options)
        self._model: Any = None
        self._languages: frozenset[str] | None = None

    def load(self) -> ModelInfo:
        """Load the CTranslate2 model. Raises: ModelLoadError."""
        from faster_whisper import WhisperModel

        model_dir = Path(self._spec.model_dir)
        device = _device(self._spec.device)
        threads = int(self._spec.options.get("num_threads", "0") or 0) or _num_cpus()
        try:
            self._model = WhisperModel(
                str(model_dir),
                device=device,
                compute_type=self._options.compute_type,
                cpu_threads=threads,
                local_files_only=True,
            )
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError for bad dirs
            raise ModelLoadError(
                f"cannot load {model_dir} as a CTranslate2 Whisper: {exc}"
            ) from exc
        if self._model.model.is_multilingual:
            self._languages = frozenset(self._model.supported_languages)
        _log.info("loaded %s on %s (%s)", model_dir, device, self._options.compute_type)
        return ModelInfo(
            context_length=WHISPER_CONTEXT,
            dtype=self._options.compute_type,
            device=device,
            inputs=SPEECH_INPUTS,
            outputs=SPEECH_OUTPUTS,
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Run one second of silence through the model."""
        silence = silence_wav(1.0)
        run_batch(self, [TranscribeRequest("__lmaas_warmup__", silence, timestamps=False)])

    def health(self) -> bool:
        return self._model is not None

    def accepts(self) -> tuple[type, ...]:
        return (TranscribeRequest,)

    def preprocess(self, request: InferRequest) -> Prepared:
        """Check the parameters and decode the audio. Raises: InvalidRequestError,
        PayloadTooLargeError."""
        request, language, audio = checked_audio(
            request, self._languages, self._options.max_audio_s
        )
        seconds = math.ceil(audio.shape[0] / SAMPLE_RATE)
        return Prepared(request.request_id, [(seconds, (request, language, audio))], request)

    def forward(self, payloads: list[Any]) -> list[TranscriptionResult]:
        if self._model is None:
            raise InternalError("the model is not loaded")
        return [self._transcribe(*payload) for payload in payloads]

    def postprocess(self, prepared: Prepared) -> TranscriptionResult:
        result: TranscriptionResult = prepared.outputs[0]
        return result

    def _transcribe(
        self, request: TranscribeRequest, language: str | None, audio: Any
    ) -> TranscriptionResult:
        temperature: Any = (
            FALLBACK_TEMPERATURES if request.temperature == 0.0 else request.temperature
        )
        segments, info = self._model.transcribe(
            audio,
            language=language,
            task=request.task,
            beam_size=self._options.beam_size,
            temperature=temperature,
            initial_prompt=request.prompt or None,
            without_timestamps=not request.timestamps,
            vad_filter=False,
        )
        parts = [(s.start, s.end, s.text) for s in segments]
        duration_s = audio.shape[0] / SAMPLE_RATE
        return build_result(request.request_id, info.language or "en", duration_s, parts)


def _device(requested: str) -> str:
    """``auto`` → ``cuda`` when CTranslate2 sees a GPU, else ``cpu``."""
    import ctranslate2

    kind = requested.split(":", 1)[0]
    if kind == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if kind not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {requested!r} for CTranslate2 (cpu, cuda or auto)")
    if kind == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available")
    return kind


def _num_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
