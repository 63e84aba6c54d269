"""tritonclient.http against a real uvicorn server over the fake engine (loopback only)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn

from lmaas.api import ApiServices, create_app
from lmaas.testing.fakes import FakeEngineClient, fake_embedding

tritonhttp = pytest.importorskip("tritonclient.http")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def engine() -> FakeEngineClient:
    return FakeEngineClient()


@pytest.fixture(scope="module")
def server_url(engine: FakeEngineClient) -> Iterator[str]:
    port = _free_port()
    app = create_app(ApiServices(engine=engine, version="9.9.9"))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_tritonclient_end_to_end(server_url: str) -> None:
    client = tritonhttp.InferenceServerClient(url=server_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fake-embed")
    meta = client.get_model_metadata("fake-embed")
    assert meta["inputs"][0]["name"] == "text"
    assert client.get_server_metadata()["version"] == "9.9.9"

    texts = np.array([[b"hello world"], [b"x"]], dtype=np.object_)
    expected = np.array([fake_embedding("hello world", 8), fake_embedding("x", 8)])
    for binary in (True, False):
        inp = tritonhttp.InferInput("text", [2, 1], "BYTES")
        inp.set_data_from_numpy(texts, binary_data=binary)
        out = tritonhttp.InferRequestedOutput("embedding", binary_data=binary)
        result = client.infer("fake-embed", [inp], outputs=[out], request_id="r-1")
        got = result.as_numpy("embedding")
        assert got.dtype == np.float32 and got.shape == (2, 8)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert result.get_response()["id"] == "r-1"

    inp = tritonhttp.InferInput("text", [2, 1], "BYTES")
    inp.set_data_from_numpy(texts)
    result = client.infer("fake-embed", [inp])  # no outputs named: all come back binary
    assert result.as_numpy("embedding").shape == (2, 8)

    prompt = tritonhttp.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"one two three"], dtype=np.object_))
    max_tokens = tritonhttp.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([2], dtype=np.int32))
    result = client.infer("fake-chat", [prompt, max_tokens])
    assert result.as_numpy("text_output").tolist() == [b"one two"]

    with pytest.raises(Exception, match="unknown output"):
        bad = tritonhttp.InferRequestedOutput("nope")
        client.infer("fake-embed", [inp], outputs=[bad])
    client.close()


def test_stream_disconnect_over_real_socket(server_url: str, engine: FakeEngineClient) -> None:
    host, port = server_url.split(":")
    words = " ".join(["w"] * 50)
    body = json.dumps(
        {"model": "fake-chat", "stream": True, "messages": [{"role": "user", "content": words}]}
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    engine.token_delay_s = 0.02
    aborted_before = engine.num_aborted
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            assert b"200 OK" in sock.recv(4096)
        deadline = time.monotonic() + 2
        while engine.num_aborted == aborted_before and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.token_delay_s = 0.0
    assert engine.num_aborted == aborted_before + 1
