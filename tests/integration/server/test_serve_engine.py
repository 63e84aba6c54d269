"""The LLM engine behind the real server: cancellation frees KV blocks, engine stats exported."""

from __future__ import annotations

import re
import time

import httpx

from tests.integration.serverproc import ServerProcess


def _engine_stat(server: ServerProcess, stat: str) -> int | None:
    text = httpx.get(f"{server.base_url}/metrics").text
    pattern = rf'lmaas_engine_stat\{{model="tiny-chat",stat="{stat}"\}} ([0-9.e+]+)'
    match = re.search(pattern, text)
    return int(float(match.group(1))) if match else None


def _wait_for_stat(server: ServerProcess, stat: str, want: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    value = _engine_stat(server, stat)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.2)
        value = _engine_stat(server, stat)
    return value if value is not None else -1


def test_disconnect_frees_the_kv_blocks(server: ServerProcess) -> None:
    deadline = time.monotonic() + 10
    while _engine_stat(server, "kv_free_blocks") is None:
        assert time.monotonic() < deadline, "no engine stats in /metrics"
        time.sleep(0.2)
    total = _engine_stat(server, "kv_total_blocks")
    assert total is not None and total > 0
    idle = _wait_for_stat(server, "kv_free_blocks", total)
    assert idle == total
    body = {
        "model": "tiny-chat",
        "prompt": "a long story " * 20,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                chunks += 1
            if chunks == 3:
                break
    # The stream is closed: the engine aborts the request and its blocks are free again.
    assert _wait_for_stat(server, "kv_free_blocks", idle) == idle
    assert _wait_for_stat(server, "running", 0) == 0
