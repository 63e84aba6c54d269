"""``POST /v1/audio/transcriptions`` (and ``/translations``) over a fake engine: form parsing,
formats, errors, caps."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from api_helpers import AsgiCall
from fastapi import FastAPI
from openai import AsyncOpenAI

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import InferRequest, Segment, TranscribeRequest, TranscriptionResult
from lmaas.core.types import Task
from lmaas.testing.fakes import FakeEngineClient, FakeModelSpec, default_fake_models

pytestmark = pytest.mark.anyio
URL = "/v1/audio/transcriptions"
AUDIO = b"RIFF fake audio bytes"


async def _fake_transcribe(model: str, request: InferRequest) -> TranscriptionResult:
    assert isinstance(request, TranscribeRequest)
    if request.audio.startswith(b"garbage"):
        raise InvalidRequestError("the file could not be decoded as audio", param="file")
    segments = [Segment(0, 0.0, 1.25, " Hello there."), Segment(1, 1.25, 2.5, " General.")]
    if not request.timestamps:
        segments = [Segment(0, 0.0, 2.5, " Hello there. General.")]
    return TranscriptionResult(request.request_id, "Hello there. General.", "en", 2.5, segments)


@pytest.fixture
def speech_engine() -> FakeEngineClient:
    models = [*default_fake_models(), FakeModelSpec("fake-whisper", Task.SPEECH_TO_TEXT)]
    engine = FakeEngineClient(models)
    engine.infer_handlers[TranscribeRequest] = _fake_transcribe
    return engine


@pytest.fixture
def speech_app(make_app: Callable[..., FastAPI], speech_engine: FakeEngineClient) -> FastAPI:
    return make_app(speech_engine, max_body_bytes=64 * 1024)


@pytest.fixture
async def speech_client(speech_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=speech_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://lmaas.test") as c:
        yield c


async def _post(
    client: httpx.AsyncClient, audio: bytes | None = AUDIO, **fields: str
) -> httpx.Response:
    data = {"model": "fake-whisper", **fields}
    files = {"file": ("speech.wav", audio, "audio/wav")} if audio is not None else None
    if files is None:
        # Still multipart: a form without the file field.
        files = {"other": ("x.txt", b"x", "text/plain")}
    return await client.post(URL, data=data, files=files)


async def test_json_is_the_default(
    speech_client: httpx.AsyncClient, speech_engine: FakeEngineClient
) -> None:
    response = await _post(speech_client, language="en", prompt="Greetings", temperature="0.4")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "text": "Hello there. General.",
        "usage": {"type": "duration", "seconds": 3},
    }
    sent = speech_engine.last_infer
    assert isinstance(sent, TranscribeRequest)
    assert (sent.audio, sent.language, sent.prompt, sent.temperature) == (
        AUDIO,
        "en",
        "Greetings",
        0.4,
    )
    assert sent.timestamps is False


async def test_text(speech_client: httpx.AsyncClient) -> None:
    response = await _post(speech_client, response_format="text")
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Hello there. General.\n"


async def test_verbose_json(
    speech_client: httpx.AsyncClient, speech_engine: FakeEngineClient
) -> None:
    response = await _post(speech_client, response_format="verbose_json")
    body = response.json()
    assert body["task"] == "transcribe" and body["language"] == "en"
    assert body["duration"] == 2.5 and body["text"] == "Hello there. General."
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in body["segments"]] == [
        (0, 0.0, 1.25, " Hello there."),
        (1, 1.25, 2.5, " General."),
    ]
    assert isinstance(speech_engine.last_infer, TranscribeRequest)
    assert speech_engine.last_infer.timestamps is True


async def test_srt_and_vtt(speech_client: httpx.AsyncClient) -> None:
    srt = await _post(speech_client, response_format="srt")
    assert srt.text == (
        "1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n"
        "2\n00:00:01,250 --> 00:00:02,500\nGeneral.\n"
    )
    vtt = await _post(speech_client, response_format="vtt")
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello there.\n")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"audio": None}, "file"),
        ({"audio": b""}, "file"),
        ({"response_format": "xml"}, "response_format"),
        ({"temperature": "1.5"}, "temperature"),
        ({"temperature": "-0.1"}, "temperature"),
        ({"temperature": "nan"}, "temperature"),
        ({"temperature": "warm"}, "temperature"),
        ({"model": ""}, "model"),
        ({"model": "fake-chat"}, "model"),
        ({"audio": b"garbage"}, "file"),
    ],
)
async def test_bad_fields_are_400_with_param(
    speech_client: httpx.AsyncClient, kwargs: dict[str, Any], param: str
) -> None:
    response = await _post(speech_client, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_unknown_model_is_404(speech_client: httpx.AsyncClient) -> None:
    response = await _post(speech_client, model="nope")
    assert response.status_code == 404


async def test_a_json_body_is_400(speech_client: httpx.AsyncClient) -> None:
    response = await speech_client.post(URL, json={"model": "fake-whisper", "file": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"


async def test_uploads_may_exceed_the_json_body_cap(speech_client: httpx.AsyncClient) -> None:
    # max_body_bytes is 64 KiB here; the audio route has its own cap (25 MiB by default).
    response = await _post(speech_client, audio=b"\x01" * (200 * 1024))
    assert response.status_code == 200, response.text
    too_big_json = await speech_client.post(
        "/v1/embeddings", json={"model": "fake-embed", "input": "x" * (100 * 1024)}
    )
    assert too_big_json.status_code == 413


async def test_over_the_upload_cap_is_413_before_reading(
    make_app: Callable[..., FastAPI], speech_engine: FakeEngineClient
) -> None:
    app = make_app(speech_engine)
    declared = 25 * 1024 * 1024 + 512 * 1024
    headers = [
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"content-length", str(declared).encode()),
    ]
    call = AsgiCall(app, URL, b"--xyz\r\n", headers=headers)
    await call.run()
    assert call.status == 413
    assert call.num_body_reads == 0
    assert json.loads(call.body)["error"]["type"] == "invalid_request_error"


async def test_file_over_the_cap_inside_a_chunked_body_is_413(
    make_app: Callable[..., FastAPI], speech_engine: FakeEngineClient
) -> None:
    app = make_app(speech_engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(27):
            yield b"\0" * (1024 * 1024)

    async with httpx.AsyncClient(transport=transport, base_url="http://lmaas.test") as client:
        response = await client.post(
            URL,
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
    assert response.status_code == 413


async def test_the_openai_sdk_parses_every_format(speech_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=speech_app, raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://lmaas.test")
    client = AsyncOpenAI(
        base_url="http://lmaas.test/v1", api_key="unused", http_client=http, max_retries=0
    )
    async with client:
        plain = await client.audio.transcriptions.create(
            model="fake-whisper", file=("a.wav", AUDIO), language="en"
        )
        assert plain.text == "Hello there. General."
        verbose = await client.audio.transcriptions.create(
            model="fake-whisper", file=("a.wav", AUDIO), response_format="verbose_json"
        )
        assert verbose.duration == 2.5
        assert verbose.segments is not None and verbose.segments[1].start == 1.25
        srt = await client.audio.transcriptions.create(
            model="fake-whisper", file=("a.wav", AUDIO), response_format="srt"
        )
        assert isinstance(srt, str) and srt.startswith("1\n00:00:00,000 --> ")


async def test_v2_infer_transcribes_and_checks_the_input(
    speech_client: httpx.AsyncClient, speech_engine: FakeEngineClient
) -> None:
    meta = (await speech_client.get("/v2/models/fake-whisper")).json()
    assert meta["platform"] == "lmaas_speech-to-text"
    audio = {"name": "audio", "datatype": "BYTES", "shape": [1], "data": ["RIFF fake"]}
    body = {"inputs": [audio], "parameters": {"language": "en", "temperature": 0.2}}
    response = await speech_client.post("/v2/models/fake-whisper/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert (output["name"], output["datatype"], output["data"]) == (
        "text",
        "BYTES",
        ["Hello there. General."],
    )
    sent = speech_engine.last_infer
    assert isinstance(sent, TranscribeRequest) and sent.audio == b"RIFF fake"
    assert (sent.language, sent.temperature) == ("en", 0.2)
    for bad in (
        {"inputs": [{**audio, "shape": [2], "data": ["a", "b"]}]},
        {"inputs": [{**audio, "datatype": "FP32", "data": [1.0]}]},
        {"inputs": [audio], "parameters": {"temperature": 3}},
        {"inputs": [audio], "parameters": {"language": 5}},
    ):
        bad_response = await speech_client.post("/v2/models/fake-whisper/infer", json=bad)
        assert bad_response.status_code == 400, (bad, bad_response.text)


async def test_translations_send_the_translate_task_without_a_language(
    speech_client: httpx.AsyncClient, speech_engine: FakeEngineClient
) -> None:
    files = {"file": ("speech.wav", AUDIO, "audio/wav")}
    data = {
        "model": "fake-whisper",
        "prompt": "Greetings",
        "temperature": "0.2",
        "language": "fr",  # not a translations field: ignored, as OpenAI has none
        "response_format": "verbose_json",
    }
    response = await speech_client.post("/v1/audio/translations", data=data, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "translate" and body["text"] == "Hello there. General."
    sent = speech_engine.last_infer
    assert isinstance(sent, TranscribeRequest)
    assert (sent.task, sent.language, sent.prompt, sent.temperature) == (
        "translate",
        None,
        "Greetings",
        0.2,
    )
    plain = await speech_client.post(
        "/v1/audio/translations", data={"model": "fake-whisper"}, files=files
    )
    assert plain.json() == {
        "text": "Hello there. General.",
        "usage": {"type": "duration", "seconds": 3},
    }
    transcribed = await _post(speech_client)
    assert transcribed.status_code == 200
    assert isinstance(speech_engine.last_infer, TranscribeRequest)
    assert speech_engine.last_infer.task == "transcribe"


async def test_translations_check_fields_and_cap_like_transcriptions(
    speech_client: httpx.AsyncClient,
) -> None:
    url = "/v1/audio/translations"
    files = {"file": ("speech.wav", AUDIO, "audio/wav")}
    bad = await speech_client.post(
        url, data={"model": "fake-whisper", "response_format": "xml"}, files=files
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    wrong_task = await speech_client.post(url, data={"model": "fake-chat"}, files=files)
    assert wrong_task.status_code == 400 and wrong_task.json()["error"]["param"] == "model"
    # The audio routes' own body cap (not the 64 KiB JSON cap of this app).
    big = {"file": ("speech.wav", b"\x01" * (200 * 1024), "audio/wav")}
    assert (await speech_client.post(url, data={"model": "fake-whisper"}, files=big)).is_success
    schema = (await speech_client.get("/openapi.json")).json()
    form = schema["paths"][url]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "language" not in form["schema"]["properties"]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks the route so
async def test_the_openai_sdk_translates(speech_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=speech_app, raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://lmaas.test")
    client = AsyncOpenAI(
        base_url="http://lmaas.test/v1", api_key="unused", http_client=http, max_retries=0
    )
    async with client:
        plain = await client.audio.translations.create(model="fake-whisper", file=("a.wav", AUDIO))
        assert plain.text == "Hello there. General."
        vtt = await client.audio.translations.create(
            model="fake-whisper", file=("a.wav", AUDIO), response_format="vtt"
        )
        assert isinstance(vtt, str) and vtt.startswith("WEBVTT")


async def test_v2_infer_takes_a_translate_task(
    speech_client: httpx.AsyncClient, speech_engine: FakeEngineClient
) -> None:
    audio = {"name": "audio", "datatype": "BYTES", "shape": [1], "data": ["RIFF fake"]}
    url = "/v2/models/fake-whisper/infer"
    body = {"inputs": [audio], "parameters": {"task": "translate"}}
    assert (await speech_client.post(url, json=body)).status_code == 200
    assert isinstance(speech_engine.last_infer, TranscribeRequest)
    assert speech_engine.last_infer.task == "translate"
    bad = {"inputs": [audio], "parameters": {"task": "summarise"}}
    reply = await speech_client.post(url, json=bad)
    assert reply.status_code == 400 and "'task'" in reply.json()["error"]
