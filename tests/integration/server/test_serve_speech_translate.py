"""``POST /v1/audio/translations`` through a real ``lmaas serve`` (plumbing, not quality: random
tiny Whispers): a multilingual transformers Whisper translates in every format and over the openai
SDK; an English-only Whisper answers a clear 400 on both runtimes (transformers, and
faster-whisper on a CTranslate2 conversion, which CTranslate2 takes for English-only because
of its small vocabulary), and keeps transcribing."""

from __future__ import annotations

import math
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, OpenAI

from lmaas.registry.service import RegistryService
from lmaas.testing.tiny_speech import build_tiny_whisper
from tests.integration.serverproc import ServerProcess, start_server

RATE = 16_000


def _chirp_wav(seconds: float) -> bytes:
    n = int(seconds * RATE)
    samples = [
        int(12_000 * math.sin(2 * math.pi * (200 + 150 * i / RATE) * i / RATE)) for i in range(n)
    ]
    data = struct.pack(f"<{n}h", *samples)
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16)
    return header + b"data" + struct.pack("<I", len(data)) + data


def _ct2_of(hf_dir: Path, dest: Path) -> Path:
    converters = pytest.importorskip("ctranslate2.converters")
    copy = ["tokenizer.json", "preprocessor_config.json"]
    converters.TransformersConverter(str(hf_dir), copy_files=copy).convert(
        str(dest), quantization="float32", force=True
    )
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("translate-models")
    multi = build_tiny_whisper(root / "multi", seed=1, num_layers=1)
    english = build_tiny_whisper(root / "en", seed=2, num_layers=1, multilingual=False)
    ct2 = _ct2_of(multi, root / "ct2")
    home = tmp_path_factory.mktemp("translate-home")
    options = {"options": {"max_new_tokens": "6"}}
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    registry.import_model(str(multi), name="whisper-multi", serving=options)
    registry.import_model(str(english), name="whisper-en", serving=options)
    registry.import_model(str(ct2), name="whisper-ct2", serving={"options": {"beam_size": "1"}})
    registry.close()
    proc = start_server(home, ["whisper-multi", "whisper-en", "whisper-ct2"])
    try:
        proc.wait_ready(300)
        yield proc
    finally:
        assert proc.stop() in (0, -signal.SIGTERM)


def test_a_multilingual_whisper_translates_in_every_format(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/audio/translations"
    audio = _chirp_wav(1.5)
    for response_format in ("json", "text", "verbose_json", "srt", "vtt"):
        form = {"model": "whisper-multi", "response_format": response_format, "temperature": "0"}
        reply = httpx.post(url, data=form, files={"file": ("a.wav", audio)}, timeout=120)
        assert reply.status_code == 200, (response_format, reply.text)
        if response_format == "verbose_json":
            body = reply.json()
            assert body["task"] == "translate" and body["duration"] == pytest.approx(1.5)
            assert body["language"] in ("en", "fr", "de")  # the detected spoken language
    assert reply.text.startswith("WEBVTT\n")
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated
        result = client.audio.translations.create(model="whisper-multi", file=("a.wav", audio))
    assert isinstance(result.text, str)


@pytest.mark.parametrize("model", ["whisper-en", "whisper-ct2"])
def test_an_english_only_whisper_is_a_clear_400_and_still_transcribes(
    server: ServerProcess, model: str
) -> None:
    audio = _chirp_wav(1.0)
    files = {"file": ("a.wav", audio)}
    refused = httpx.post(
        f"{server.base_url}/v1/audio/translations", data={"model": model}, files=files, timeout=120
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "model" and "English-only" in error["message"], error
    assert "cannot translate" in error["message"]
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError), pytest.warns(DeprecationWarning):
        client.audio.translations.create(model=model, file=("a.wav", audio))
    transcribed = httpx.post(
        f"{server.base_url}/v1/audio/transcriptions",
        data={"model": model},
        files=files,
        timeout=120,
    )
    assert transcribed.status_code == 200, transcribed.text
