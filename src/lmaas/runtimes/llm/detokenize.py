"""Incremental detokenisation: token ids in, text deltas out, never half a character."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Decoding a new token together with a few tokens before it keeps what depends on the left
# context (a SentencePiece leading space, a byte sequence split over tokens) right.
_NUM_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing sequence of output token ids into text deltas.

    Text is held back while the decoded tail ends with U+FFFD, i.e. while a multi-byte UTF-8
    character is only partly generated, so no delta ever splits a character. Each step decodes
    only a short window of ids (the TGI / vLLM prefix-offset scheme), not the whole output.

    Args:
        tokenizer: Decodes ids to text; special tokens are skipped.
        prompt_ids: The prompt; its last few ids serve as left context.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_NUM_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final (may be empty)."""
        self._ids.append(token_id)
        prefix_text, full_text = self._decode_window()
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of a sequence: return whatever is still held back, complete or not."""
        prefix_text, full_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        return prefix, full
