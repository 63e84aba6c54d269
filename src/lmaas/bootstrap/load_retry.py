"""Tries again, with exponential backoff, the deployment changes a gateway could not apply.

A change whose stable version did not load (a missing file, a GPU still held by a leaving
replica, a full disk...) is retried ``initial_s`` after its failure, then after twice as long
each time it fails again, at most ``max_s`` apart, until it loads; a new change of the name or
its stop cancels the tries (:meth:`LoadRetries.cancel`). Plain asyncio timers: no DB, no engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_log = logging.getLogger("lmaas.deploy")


def retry_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before trying a change again after its ``failures``-th failed try:
    ``initial_s`` doubling each time, at most ``max_s``."""
    return min(max_s, initial_s * 2.0 ** min(max(failures - 1, 0), 64))


@dataclass(slots=True)
class LoadRetry:
    """The tries of one stored revision that this gateway could not apply.

    Attributes:
        revision: The revision being retried.
        failures: Tries that failed so far (the first apply included).
        next_at: When the next try starts (epoch seconds).
        timer: The scheduled try (None once it started).
    """

    revision: int
    failures: int
    next_at: float
    timer: asyncio.TimerHandle | None = None

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """``revision``, ``attempts`` (failed tries), ``next_retry_at`` (ISO 8601 UTC) and,
        given ``now`` (epoch seconds), ``next_retry_in_s``."""
        data: dict[str, Any] = {
            "revision": self.revision,
            "attempts": self.failures,
            "next_retry_at": datetime.fromtimestamp(self.next_at, UTC).isoformat(),
        }
        if now is not None:
            data["next_retry_in_s"] = round(max(0.0, self.next_at - now), 1)
        return data


class LoadRetries:
    """The scheduled tries of each name's failed change.

    Args:
        initial_s: Wait after the first failure (0: never retry).
        max_s: Longest wait between two tries.
        on_due: Called with the name when its next try is due (on the event loop).
        clock: Epoch seconds (``time.time``), for ``next_at``.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        on_due: Callable[[str], None],
        clock: Callable[[], float],
    ) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._on_due = on_due
        self._clock = clock
        self._retries: dict[str, LoadRetry] = {}

    def get(self, name: str) -> LoadRetry | None:
        return self._retries.get(name)

    def describe(self, name: str, now: float | None = None) -> dict[str, Any] | None:
        """What :meth:`LoadRetry.to_dict` says of ``name``'s tries; None without any."""
        retry = self._retries.get(name)
        return None if retry is None else retry.to_dict(now)

    def failed(self, name: str, revision: int, loop: asyncio.AbstractEventLoop) -> None:
        """``revision`` of ``name`` failed (again): schedule its next try."""
        if self._initial_s <= 0:
            return
        previous = self._retries.get(name)
        same = previous is not None and previous.revision == revision
        failures = previous.failures + 1 if previous is not None and same else 1
        self.cancel(name)
        delay = retry_delay(failures, self._initial_s, self._max_s)
        retry = LoadRetry(revision, failures, self._clock() + delay)
        retry.timer = loop.call_later(delay, self._due, name, retry)
        self._retries[name] = retry
        _log.warning(
            "deployment %s: revision %d failed %d time(s); trying again in %.1f s",
            name,
            revision,
            failures,
            delay,
        )

    def cancel(self, name: str) -> None:
        """Forget ``name``'s tries (it loaded, changed again or stopped)."""
        retry = self._retries.pop(name, None)
        if retry is not None and retry.timer is not None:
            retry.timer.cancel()

    def cancel_all(self) -> None:
        for name in list(self._retries):
            self.cancel(name)

    def _due(self, name: str, retry: LoadRetry) -> None:
        if self._retries.get(name) is not retry:
            return  # replaced meanwhile
        retry.timer = None
        self._on_due(name)
