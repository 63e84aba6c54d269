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


def _chat(server: ServerProcess, **body: object) -> dict[str, object]:
    payload = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], **body}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def test_json_schema_output_always_parses(server: ServerProcess) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    num_parsed = 0
    for seed in range(3):
        reply = _chat(server, response_format=response_format, max_tokens=200, seed=seed)
        choice = reply["choices"][0]  # type: ignore[index]
        if choice["finish_reason"] != "stop":
            continue  # ran out of tokens inside a long random string: not a parse guarantee
        parsed = json.loads(choice["message"]["content"])
        assert set(parsed) == {"name", "age"} and isinstance(parsed["age"], int)
        num_parsed += 1
    assert num_parsed >= 1


def test_n_choices_and_logprobs_over_http(server: ServerProcess) -> None:
    reply = _chat(server, n=3, seed=5, max_tokens=6, logprobs=True, top_logprobs=2, ignore_eos=True)
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]  # type: ignore[union-attr]
    for choice in choices:  # type: ignore[union-attr]
        content = choice["logprobs"]["content"]
        assert len(content) == 6 and all(len(t["top_logprobs"]) == 2 for t in content)
    usage = reply["usage"]
    assert usage["completion_tokens"] == 18  # type: ignore[index]
