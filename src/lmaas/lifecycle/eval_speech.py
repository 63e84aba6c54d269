"""Speech-to-text evaluation: each audio file transcribed by the runner the worker runs, then
WER and CER against the reference transcript.

A row: ``audio`` (a path, relative to the data file), ``reference`` (or ``text``), and
optionally ``language`` (an ISO-639-1 code; detected when absent, as the server does).
"""

from __future__ import annotations

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import InferRequest, TranscribeRequest, TranscriptionResult
from lmaas.lifecycle import metrics as m
from lmaas.lifecycle.datasets import EvalData, field_of
from lmaas.lifecycle.eval_common import EvalOptions, Progress, TaskScores, infer_all
from lmaas.runtimes.base import BatchRunner


def evaluate_speech(
    runner: BatchRunner, data: EvalData, options: EvalOptions, progress: Progress
) -> TaskScores:
    """Transcribe every file (read a batch at a time) and score the transcripts."""
    references = [field_of(data, i, "reference", "text") for i in range(len(data.rows))]
    predictions: list[str] = []
    audio_s = 0.0
    for start in range(0, len(data.rows), options.batch_size):
        indices = range(start, min(start + options.batch_size, len(data.rows)))
        requests = [_request(data, i) for i in indices]
        for result in infer_all(runner, requests, data, options, progress, first=start):
            assert isinstance(result, TranscriptionResult)
            predictions.append(result.text)
            audio_s += result.duration_s
    try:
        metrics = m.error_rates(predictions, references)
    except ValueError:
        raise InvalidRequestError(f"the references of {data.path.name} hold no words") from None
    samples = [
        {"prediction": p, "reference": r}
        for p, r in zip(predictions[:5], references[:5], strict=True)
    ]
    return TaskScores(metrics, {"samples": samples, "audio_seconds": audio_s})


def _request(data: EvalData, index: int) -> InferRequest:
    path = field_of(data, index, "audio")
    audio = (data.path.parent / path).expanduser()
    if not audio.is_file():
        raise InvalidRequestError(f"{data.where(index)}: audio {path!r} not found")
    language = data.rows[index].get("language")
    if language is not None and not isinstance(language, str):
        raise InvalidRequestError(f"{data.where(index)}: 'language' must be a string")
    return TranscribeRequest(
        f"eval-{index}", audio.read_bytes(), language=language or None, timestamps=False
    )
