from __future__ import annotations

import json

import pytest

from lmaas.bench.metrics import RequestOutcome
from lmaas.bench.sse import SSEDecoder, StreamTimer


def _events(lines: list[str]) -> list[str]:
    decoder = SSEDecoder()
    events = [payload for line in lines for payload in decoder.feed(line)]
    return events + list(decoder.flush())


def test_decoder_splits_events_on_blank_lines() -> None:
    assert _events(['data: {"a": 1}', "", 'data: {"b": 2}', "", "data: [DONE]", ""]) == [
        '{"a": 1}',
        '{"b": 2}',
        "[DONE]",
    ]


def test_decoder_skips_comments_and_other_fields_and_joins_data_lines() -> None:
    lines = [": ping", "event: message", "id: 7", "data: first", "data:second", "", ""]
    assert _events(lines) == ["first\nsecond"]


def test_decoder_handles_crlf_and_a_missing_final_blank_line() -> None:
    assert _events(["data: x\r", "\r", "data: y"]) == ["x", "y"]


def _chunk(text: str | None = None, usage: dict[str, int] | None = None, chat: bool = False) -> str:
    body: dict[str, object] = {"choices": []}
    if text is not None:
        choice = {"delta": {"content": text}} if chat else {"text": text}
        body["choices"] = [choice]
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


def test_timer_measures_ttft_itl_and_latency_from_choices_chunks() -> None:
    outcome = RequestOutcome(start_s=10.0)
    timer = StreamTimer(outcome)
    timer.on_payload(_chunk(""), 10.5)  # an empty first text still counts for TTFT
    timer.on_payload(_chunk(" b"), 10.7)
    timer.on_payload(_chunk(" c"), 11.0)
    timer.on_payload(_chunk(usage={"prompt_tokens": 4, "completion_tokens": 3}), 11.5)
    timer.on_payload("[DONE]", 11.6)
    assert outcome.ttft_s == pytest.approx(0.5)
    assert outcome.itl_s == pytest.approx([0.2, 0.3])
    assert outcome.latency_s == pytest.approx(1.0)  # the usage chunk does not count
    assert (outcome.output_tokens, outcome.prompt_tokens) == (3, 4)
    assert timer.usage_seen and timer.done
    assert timer.text == " b c"


def test_timer_reads_chat_deltas_and_keeps_a_known_prompt_length() -> None:
    outcome = RequestOutcome(start_s=0.0, prompt_tokens=128)
    timer = StreamTimer(outcome)
    timer.on_payload(_chunk("", chat=True), 0.1)  # the role chunk counts, as in vLLM
    timer.on_payload(_chunk("hi", chat=True), 0.2)
    timer.on_payload(_chunk(usage={"prompt_tokens": 140, "completion_tokens": 1}), 0.3)
    assert outcome.ttft_s == pytest.approx(0.1)
    assert outcome.prompt_tokens == 128
    assert timer.text == "hi"


def test_timer_raises_on_error_events_and_garbage() -> None:
    timer = StreamTimer(RequestOutcome(start_s=0.0))
    with pytest.raises(ValueError, match="error event"):
        timer.on_payload('{"error": {"message": "deadline exceeded"}}', 1.0)
    with pytest.raises(ValueError):
        timer.on_payload("not json", 1.0)
