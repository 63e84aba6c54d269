"""Stop strings over a text stream, without ever emitting text that might be retracted."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringFilter:
    """Passes text through until one of the stop strings appears.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is; a match truncates the output just before the stop string.

    Args:
        stop: Stop strings; empty strings are ignored.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return ``(text safe to emit, whether a stop string matched)``."""
        if not self._stops:
            return text, False
        self._pending += text
        # A match starts inside the pending text: anything earlier was emitted only because
        # no suffix of it could begin a stop string.
        positions = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if positions:
            emitted = self._pending[: min(positions)]
            self._pending = ""
            return emitted, True
        keep = self._held_back_len()
        cut = len(self._pending) - keep
        emitted, self._pending = self._pending[:cut], self._pending[cut:]
        return emitted, False

    def flush(self) -> str:
        """Release held-back text (the sequence ended for another reason)."""
        emitted, self._pending = self._pending, ""
        return emitted

    def _held_back_len(self) -> int:
        longest = max(len(s) for s in self._stops) - 1
        for size in range(min(longest, len(self._pending)), 0, -1):
            tail = self._pending[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
