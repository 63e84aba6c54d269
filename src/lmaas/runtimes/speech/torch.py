"""Whisper on torch through transformers (format ``safetensors``, HF layout)."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

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
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.hf_loading import load_hf_model
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

WINDOW_S = 30
"""Whisper reads 30 s of audio at a time."""
TIME_PRECISION_S = 0.02
"""One timestamp token step."""
_NUM_INIT_TOKENS = 4
"""<|startoftranscript|> <|lang|> <|transcribe|> [<|notimestamps|>]."""


@dataclass(frozen=True, slots=True)
class _Window:
    """One row: up to 30 s of one request's audio and how to decode it."""

    audio: npt.NDArray[np.float32]
    offset_s: float
    language: str | None
    prompt_ids: tuple[int, ...]
    temperature: float
    timestamps: bool
    task: str = "transcribe"

    @property
    def group(self) -> tuple[str | None, tuple[int, ...], float, bool, str]:
        """Windows with the same key share one ``generate`` call."""
        return (self.language, self.prompt_ids, self.temperature, self.timestamps, self.task)


Segments = list[tuple[float, float, str]]


class TorchWhisperRunner:
    """Transcribes audio with a Hugging Face Whisper checkpoint on torch.

    Implements :class:`lmaas.runtimes.base.BatchRunner`. ``preprocess`` decodes the audio and
    cuts it into 30 s windows, one row each, so the worker batches windows of many requests into
    one ``generate`` call (windows with the same language, prompt, temperature and timestamp
    setting go together). Each window is decoded on its own: unlike faster-whisper, the text of
    one window does not condition the next and a word cut by a window edge may be lost; the CT2
    runtime runs Whisper's sequential long-form algorithm instead. Temperature 0 decodes greedily,
    a higher one samples (no fallback schedule). Segment times come from Whisper's timestamp
    tokens; a window without any becomes one segment over the window.

    Args:
        spec: The worker spec; options ``max_audio_s``, ``max_new_tokens``, ``num_threads``.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._options = speech_options(spec.options)
        self._model: Any = None
        self._tokenizer: Any = None
        self._extractor: Any = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._lang_by_id: dict[int, str] = {}
        self._languages: frozenset[str] | None = None
        self._timestamp_begin = 0
        self._sot_id = 0
        self._tokenizer_lock = threading.Lock()

    def load(self) -> ModelInfo:
        """Load the model, tokenizer and feature extractor. Raises: ModelLoadError."""
        import transformers

        self._device = resolve_device(self._spec.device)
        self._dtype = resolve_dtype(self._spec.dtype, self._device, prefer_float32_on_cpu=True)
        configure_threads(num_threads_option(self._spec.options))
        model, self._tokenizer = load_hf_model(self._spec, "AutoModelForSpeechSeq2Seq", self._dtype)
        if getattr(model.config, "model_type", None) != "whisper":
            raise ModelLoadError(
                f"{model.config.model_type!r} models are not supported: Whisper only"
            )
        try:
            self._extractor = transformers.WhisperFeatureExtractor.from_pretrained(
                self._spec.model_dir, local_files_only=True
            )
        except Exception as exc:  # OSError for a missing preprocessor_config.json, ...
            raise ModelLoadError(f"cannot load the Whisper feature extractor: {exc}") from exc
        self._model = model.to(self._device).eval()
        gen = model.generation_config
        if not hasattr(gen, "no_timestamps_token_id"):
            raise ModelLoadError("the generation config lacks no_timestamps_token_id")
        self._timestamp_begin = int(gen.no_timestamps_token_id) + 1
        self._sot_id = int(gen.decoder_start_token_id)
        if getattr(gen, "is_multilingual", False) and getattr(gen, "lang_to_id", None):
            self._lang_by_id = {int(i): t.strip("<|>") for t, i in gen.lang_to_id.items()}
            self._languages = frozenset(self._lang_by_id.values())
        _log.info("loaded %s on %s (%s)", self._spec.model_dir, self._device, self._dtype)
        return ModelInfo(
            context_length=int(getattr(model.config, "max_target_positions", WHISPER_CONTEXT)),
            dtype=dtype_name(self._dtype),
            device=str(self._device),
            vocab_size=int(model.config.vocab_size),
            inputs=SPEECH_INPUTS,
            outputs=SPEECH_OUTPUTS,
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Transcribe one second of silence."""
        run_batch(self, [TranscribeRequest("__lmaas_warmup__", silence_wav(1.0))])

    def health(self) -> bool:
        return self._model is not None

    def accepts(self) -> tuple[type, ...]:
        return (TranscribeRequest,)

    def preprocess(self, request: InferRequest) -> Prepared:
        """Check, decode, tokenise the prompt and cut 30 s windows. Raises: InvalidRequestError,
        PayloadTooLargeError."""
        request, language, audio = checked_audio(
            request, self._languages, self._options.max_audio_s
        )
        prompt = self._prompt_ids(request.prompt)
        step = WINDOW_S * SAMPLE_RATE
        rows: list[tuple[int, Any]] = []
        for start in range(0, audio.shape[0], step):
            chunk = audio[start : start + step]
            window = _Window(
                chunk,
                start / SAMPLE_RATE,
                language,
                prompt,
                request.temperature,
                request.timestamps,
                request.task,
            )
            rows.append((math.ceil(chunk.shape[0] / SAMPLE_RATE), window))
        return Prepared(request.request_id, rows, (request, audio.shape[0] / SAMPLE_RATE))

    @torch.inference_mode()
    def forward(self, payloads: list[_Window]) -> list[tuple[str, Segments]]:
        if self._model is None:
            raise InternalError("the model is not loaded")
        outputs: list[tuple[str, Segments] | None] = [None] * len(payloads)
        groups: dict[tuple[str | None, tuple[int, ...], float, bool, str], list[int]] = {}
        for index, window in enumerate(payloads):
            groups.setdefault(window.group, []).append(index)
        for indices in groups.values():
            results = self._generate([payloads[i] for i in indices])
            for i, result in zip(indices, results, strict=True):
                outputs[i] = result
        return [out for out in outputs if out is not None]

    def postprocess(self, prepared: Prepared) -> TranscriptionResult:
        request, duration_s = prepared.context
        segments: Segments = []
        for (_, window), (_, parts) in zip(prepared.rows, prepared.outputs, strict=True):
            segments += [(window.offset_s + s, window.offset_s + e, t) for s, e, t in parts]
        language = prepared.outputs[0][0]
        return build_result(request.request_id, language, duration_s, segments)

    # ------------------------------------------------------------------ helpers

    def _prompt_ids(self, prompt: str | None) -> tuple[int, ...]:
        if not prompt or not prompt.strip():
            return ()
        with self._tokenizer_lock:
            ids = self._tokenizer.get_prompt_ids(prompt.strip(), return_tensors="np").tolist()
        # <|startofprev|> then the last tokens of the text: at most half the context, as Whisper.
        keep = WHISPER_CONTEXT // 2 - 1
        return (ids[0], *ids[1:][-keep:])

    def _generate(self, windows: list[_Window]) -> list[tuple[str, Segments]]:
        first = windows[0]
        features = self._extractor(
            [w.audio for w in windows], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self._device, self._dtype)
        languages = self._languages_of(features, first.language, len(windows))
        kwargs: dict[str, Any] = {}
        if first.prompt_ids:
            kwargs["prompt_ids"] = torch.tensor(first.prompt_ids, device=self._device)
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature)
        else:
            kwargs.update(do_sample=False, num_beams=1)
        room = WHISPER_CONTEXT - len(first.prompt_ids) - _NUM_INIT_TOKENS
        sequences = self._model.generate(
            features,
            return_timestamps=first.timestamps,
            language=languages if self._languages is not None else None,
            task=first.task if self._languages is not None else None,
            max_new_tokens=max(1, min(self._options.max_new_tokens, room)),
            force_unique_generate_call=True,
            **kwargs,
        )
        if isinstance(sequences, dict):
            sequences = sequences["sequences"]
        out: list[tuple[str, Segments]] = []
        for window, language, ids in zip(windows, languages, sequences.tolist(), strict=True):
            parts = self._segments(ids, window.audio.shape[0] / SAMPLE_RATE)
            out.append((language, parts))
        return out

    def _languages_of(self, features: torch.Tensor, language: str | None, n: int) -> list[str]:
        if language is not None:
            return [language] * n
        if self._languages is None:
            return ["en"] * n
        lang_ids = self._model.detect_language(features)
        return [self._lang_by_id.get(int(i), "en") for i in lang_ids.reshape(-1).tolist()]

    def _segments(self, ids: list[int], window_s: float) -> Segments:
        """Split generated ids at timestamp tokens into (start, end, text) within the window."""
        if self._sot_id in ids:
            ids = ids[ids.index(self._sot_id) + 1 :]  # drop the prompt and <|startoftranscript|>
        segments: Segments = []
        start: float | None = None
        last_end = 0.0
        text_ids: list[int] = []
        for token in ids:
            if token < self._timestamp_begin:
                text_ids.append(token)
                continue
            time_s = (token - self._timestamp_begin) * TIME_PRECISION_S
            if text_ids:
                segments.append(
                    (last_end if start is None else start, time_s, self._decode(text_ids))
                )
                text_ids, start, last_end = [], None, time_s
            else:
                start = time_s
        if text_ids:
            segments.append(
                (last_end if start is None else start, window_s, self._decode(text_ids))
            )
        return segments

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text
