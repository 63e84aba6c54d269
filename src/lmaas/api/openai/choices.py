"""One choice of a chat / text completion (``n`` > 1 gives several) and its OpenAI shapes.

Logprobs shapes follow OpenAI: chat answers ``{"content": [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]}``; legacy completions answer ``{tokens,
token_logprobs, top_logprobs: [{token: logprob}], text_offset}``, offsets counted in characters
from the start of the choice's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmaas.core.messages import SeqDelta, TokenLogprob

Kind = Literal["chat", "text"]


@dataclass(slots=True)
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False
    """A streamed chunk was sent (chat sends the role in the first one only)."""
    text_offset: int = 0
    """Characters of token text before the next logprob entry (completions' text_offset)."""

    def add(self, delta: SeqDelta, keep: bool) -> None:
        """Record ``delta``; ``keep`` keeps text and logprobs for a non-streamed answer."""
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if keep:
            self.parts.append(delta.text)
            self.logprobs.extend(delta.logprobs or ())

    def full(self, kind: Kind, logprobs: bool) -> dict[str, Any]:
        """The choice of a non-streamed answer."""
        text = "".join(self.parts)
        choice: dict[str, Any] = {"index": self.index}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self.render_logprobs(kind, self.logprobs) if logprobs else None
        choice["finish_reason"] = self.finish_reason or "stop"
        return choice

    def chunk(
        self,
        kind: Kind,
        text: str,
        entries: list[TokenLogprob] | None,
        finish_reason: str | None,
    ) -> dict[str, Any]:
        """The choice of one streamed chunk; ``entries`` None renders ``logprobs: null``."""
        choice: dict[str, Any] = {"index": self.index}
        if kind == "chat":
            choice["delta"] = (
                {"content": text} if self.started else {"role": "assistant", "content": text}
            )
        else:
            choice["text"] = text
        self.started = True
        choice["logprobs"] = None if entries is None else self.render_logprobs(kind, entries)
        choice["finish_reason"] = finish_reason
        return choice

    def render_logprobs(self, kind: Kind, entries: list[TokenLogprob]) -> dict[str, Any]:
        if kind == "chat":
            return {"content": [_chat_entry(e) for e in entries]}
        offsets = []
        for entry in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(entry.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries],
            "text_offset": offsets,
        }


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": _utf8(entry.token),
        "top_logprobs": [
            {"token": token, "logprob": logprob, "bytes": _utf8(token)}
            for token, logprob in entry.top
        ],
    }
