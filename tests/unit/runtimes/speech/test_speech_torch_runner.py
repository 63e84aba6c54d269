"""TorchWhisperRunner on a tiny random Whisper: loads, transcribes, batches, refuses bad input.

The weights are random, so the text is gibberish: these tests check shapes, timing, languages
and errors, never words (the real model's quality is checked in tests/e2e).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtimes_helpers import make_spec

from lmaas.core.messages import RequestError, TranscribeRequest, TranscriptionResult
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.catalog import create_runner
from lmaas.runtimes.speech.audio import SAMPLE_RATE
from lmaas.runtimes.speech.torch import TorchWhisperRunner
from lmaas.testing.tiny_speech import LANGUAGES, build_tiny_whisper


def wav_bytes(samples: np.ndarray) -> bytes:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def chirp(seconds: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return wav_bytes(0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> TorchWhisperRunner:
    model_dir = build_tiny_whisper(
        tmp_path_factory.mktemp("tiny-whisper") / "m", seed=1, num_layers=1
    )
    spec = make_spec(
        model_dir, task="speech-to-text", options={"max_new_tokens": "6", "max_audio_s": "40"}
    )
    built = create_runner(spec)
    assert isinstance(built, TorchWhisperRunner)
    info = built.load()
    assert info.inputs is not None and info.inputs[0].name == "audio"
    assert info.outputs is not None and info.outputs[0].datatype == "BYTES"
    assert info.context_length == 448
    return built


def _ok(result: object) -> TranscriptionResult:
    assert isinstance(result, TranscriptionResult), result
    return result


def test_transcribes_and_times_segments_within_the_audio(runner: TorchWhisperRunner) -> None:
    runner.warmup()
    (result,) = run_batch(runner, [TranscribeRequest("a", chirp(2.5), language="fr")])
    result = _ok(result)
    assert result.language == "fr"
    assert result.duration_s == pytest.approx(2.5)
    assert result.text == "".join(s.text for s in result.segments).strip()
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    for segment in result.segments:
        assert 0.0 <= segment.start <= segment.end <= result.duration_s


def test_detects_a_language_when_none_is_given(runner: TorchWhisperRunner) -> None:
    (result,) = run_batch(runner, [TranscribeRequest("a", chirp(1.0), timestamps=False)])
    assert _ok(result).language in LANGUAGES


def test_long_audio_is_cut_into_windows_batched_with_others(runner: TorchWhisperRunner) -> None:
    long = TranscribeRequest("long", chirp(35.0), language="en")
    prepared = runner.preprocess(long)
    assert [length for length, _ in prepared.rows] == [30, 5]
    results = run_batch(
        runner,
        [long, TranscribeRequest("short", chirp(1.0), language="en", prompt="Hello there")],
        max_batch_size=4,
    )
    first, second = (_ok(r) for r in results)
    assert first.duration_s == pytest.approx(35.0)
    assert all(s.end <= 35.0 for s in first.segments)
    assert second.request_id == "short"


def test_sampling_is_accepted(runner: TorchWhisperRunner) -> None:
    (result,) = run_batch(runner, [TranscribeRequest("a", chirp(1.0), temperature=0.7)])
    _ok(result)


def test_bad_requests_fail_alone(runner: TorchWhisperRunner) -> None:
    bad = [
        (TranscribeRequest("garbage", b"not audio at all" * 8), "file", "invalid_request"),
        (TranscribeRequest("lang", chirp(1.0), language="xx"), "language", "invalid_request"),
        (TranscribeRequest("temp", chirp(1.0), temperature=1.5), "temperature", "invalid_request"),
        (TranscribeRequest("long", chirp(41.0)), "file", "payload_too_large"),
    ]
    results = run_batch(runner, [r for r, _, _ in bad] + [TranscribeRequest("ok", chirp(1.0))])
    for (_, param, code), result in zip(bad, results, strict=False):
        assert isinstance(result, RequestError), result
        assert (result.param, result.code) == (param, code)
    assert _ok(results[-1]).request_id == "ok"


def test_english_only_model_refuses_other_languages(tmp_path: Path) -> None:
    model_dir = build_tiny_whisper(tmp_path / "en", multilingual=False, num_layers=1)
    runner = TorchWhisperRunner(
        make_spec(model_dir, task="speech-to-text", options={"max_new_tokens": "4"})
    )
    runner.load()
    fr, en = run_batch(
        runner,
        [TranscribeRequest("fr", chirp(1.0), language="fr"), TranscribeRequest("en", chirp(1.0))],
    )
    assert isinstance(fr, RequestError) and fr.param == "language"
    assert _ok(en).language == "en"


def test_translate_runs_whispers_translate_task(
    runner: TorchWhisperRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks: list[object] = []
    generate = runner._model.generate

    def spying(*args: object, **kwargs: object) -> object:
        tasks.append(kwargs.get("task"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(runner._model, "generate", spying)
    translate = TranscribeRequest("t", chirp(1.0), task="translate", timestamps=False)
    transcribe = TranscribeRequest("s", chirp(1.0), language="fr", timestamps=False)
    results = run_batch(runner, [translate, transcribe], max_batch_size=4)
    assert [_ok(r).request_id for r in results] == ["t", "s"]
    assert _ok(results[0]).language in LANGUAGES  # the spoken language, detected
    assert sorted(map(str, tasks)) == ["transcribe", "translate"]  # never in one generate call


def test_english_only_model_refuses_to_translate(tmp_path: Path) -> None:
    model_dir = build_tiny_whisper(tmp_path / "en", multilingual=False, num_layers=1)
    runner = TorchWhisperRunner(
        make_spec(model_dir, task="speech-to-text", options={"max_new_tokens": "4"})
    )
    runner.load()
    (refused,) = run_batch(runner, [TranscribeRequest("t", chirp(1.0), task="translate")])
    assert isinstance(refused, RequestError) and refused.param == "model"
    assert "English-only" in refused.message and "cannot translate" in refused.message
