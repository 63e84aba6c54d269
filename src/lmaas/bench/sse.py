"""Reading an OpenAI-style SSE stream line by line and timing its chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from lmaas.bench.metrics import RequestOutcome

DONE = "[DONE]"


@dataclass(slots=True)
class SSEDecoder:
    """Turns the lines of an ``text/event-stream`` body into event data payloads.

    Follows the SSE rules the OpenAI servers rely on: ``data:`` lines accumulate (joined by a
    newline) until a blank line dispatches the event; lines starting with ``:`` are comments
    (keep-alive pings); other fields (``event:``, ``id:``, ``retry:``) are ignored.
    """

    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> Iterator[str]:
        """Take one line (without its line break); yield the payload of a completed event."""
        line = line.rstrip("\r")
        if not line:
            if self._data:
                payload = "\n".join(self._data)
                self._data.clear()
                yield payload
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)

    def flush(self) -> Iterator[str]:
        """At the end of the body: yield an event left without its closing blank line."""
        yield from self.feed("")


@dataclass(slots=True)
class StreamTimer:
    """Applies vLLM's per-request rules to the chunks of one streamed response.

    Args:
        outcome: Receives TTFT, ITL, E2EL and the usage counts; ``outcome.start_s`` is the
            ``perf_counter()`` taken just before the POST.
    """

    outcome: RequestOutcome
    num_chunks: int = 0
    text_parts: list[str] = field(default_factory=list)
    usage_seen: bool = False
    done: bool = False
    _last_s: float = 0.0

    def on_payload(self, payload: str, now_s: float) -> None:
        """Account for one event payload received at ``now_s``.

        Raises:
            ValueError: The payload is not JSON, or it is an error event.
        """
        if payload.strip() == DONE:
            self.done = True
            return
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ValueError(f"unexpected SSE payload: {payload[:200]}")
        if "error" in chunk:
            raise ValueError(f"error event: {json.dumps(chunk['error'])[:500]}")
        choices = chunk.get("choices")
        if choices:
            self._on_choices(choices, now_s)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._on_usage(usage)

    def _on_choices(self, choices: list[dict[str, object]], now_s: float) -> None:
        out = self.outcome
        if self.num_chunks == 0:
            out.ttft_s = now_s - out.start_s
        else:
            out.itl_s.append(now_s - self._last_s)
        self.num_chunks += 1
        self._last_s = now_s
        out.latency_s = now_s - out.start_s
        first = choices[0]
        delta = first.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else first.get("text")
        if isinstance(text, str):
            self.text_parts.append(text)

    def _on_usage(self, usage: dict[str, object]) -> None:
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        if isinstance(completion, int):
            self.outcome.output_tokens = completion
            self.usage_seen = True
        if isinstance(prompt, int) and self.outcome.prompt_tokens == 0:
            self.outcome.prompt_tokens = prompt

    @property
    def text(self) -> str:
        """All generated text received so far."""
        return "".join(self.text_parts)
