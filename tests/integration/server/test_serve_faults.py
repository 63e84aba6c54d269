"""Crash recovery, readiness and draining of a real server (fake echo runner, no torch)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.server.conftest import start_echo_server


def _sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def test_worker_crash_mid_stream_ends_with_an_error_event_then_recovers(
    tmp_path: Path, tiny_dirs: dict[str, Path]
) -> None:
    server = start_echo_server(
        tmp_path / "home", tiny_dirs["chat"], crash_after_tokens="6", token_delay_s="0.01"
    )
    try:
        server.wait_ready(60)
        body = {"model": "echo", "prompt": "a b c", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = _sse_events(response)
        assert "[DONE]" not in events
        last = json.loads(events[-1])
        assert "error" in last and "Traceback" not in events[-1]
        assert httpx.get(f"{server.base_url}/v2/health/live").status_code == 200
        # While the worker restarts, the model is not ready and requests get 503 + Retry-After.
        deadline = time.monotonic() + 30
        while True:
            response = httpx.post(
                f"{server.base_url}/v1/completions",
                json={"model": "echo", "prompt": "x y", "max_tokens": 2},
            )
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert "retry-after" in response.headers
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.1)
        assert response.json()["choices"][0]["text"] == "x y"
        assert httpx.get(f"{server.base_url}/v2/models/echo/ready").status_code == 200
    finally:
        server.stop()


def test_sigterm_drains_in_flight_streams(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    server = start_echo_server(tmp_path / "home", tiny_dirs["chat"], token_delay_s="0.05")
    server.wait_ready(60)
    collected: list[str] = []

    def stream() -> None:
        body = {"model": "echo", "prompt": "a b", "max_tokens": 40, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as r:
            collected.extend(_sse_events(r))

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.5)  # the stream is running
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.TransportError):
        # uvicorn stops accepting connections once it drains
        httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "echo", "prompt": "x", "max_tokens": 1},
            timeout=2,
        )
    thread.join(30)
    assert collected and collected[-1] == "[DONE]", collected[-3:]
    # uvicorn re-raises the signal after a clean drain, as process managers expect
    assert server.process.wait(30) in (0, -signal.SIGTERM)
