"""The quota windows of the Redis limiter: their keys, what an admission counts in, and loading
the windows Redis does not hold from the quota source.

A window is a hash per subject and UTC day or month (:mod:`lmaas.gateway.redis_scripts`), kept a
day past its period. The admission script refuses to count on a window Redis does not hold (a
new period, a quota just added, a Redis that lost its data): the gateway then loads the window
from the usage table (the durable truth), writes it only if still absent (``SEED_LUA``: the
first gateway wins), and admits again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from lmaas.core.errors import ServiceUnavailableError
from lmaas.gateway.limits import Subject, forget_pending
from lmaas.gateway.quotas import MAX_QUOTA, QuotaMetric, QuotaSource, Window, window_of
from lmaas.gateway.redis_credit import WindowSpec
from lmaas.gateway.redis_scripts import SEED_LUA, AdmitWindows
from lmaas.gateway.resp import RedisError, RespClient, Script

_WINDOW_KEPT_AFTER_END_MS = 86_400_000
"""A window's hash outlives its period by a day (then Redis drops it)."""


def unavailable(exc: RedisError) -> ServiceUnavailableError:
    """The 503 of a limiter whose Redis cannot answer (limits fail closed)."""
    return ServiceUnavailableError(
        f"the rate limiter's Redis is unreachable ({type(exc).__name__}); retry later",
        retry_after_s=1.0,
    )


class RedisWindows:
    """Quota windows in Redis under ``prefix``, loaded from ``source`` when missing.

    Args:
        client: The limiter's Redis connection.
        prefix: The limiter's key prefix.
        source: Where a window's use so far is loaded from (the usage table).
        wall_clock: Current UTC time (when the windows end).
    """

    def __init__(
        self,
        client: RespClient,
        prefix: str,
        source: QuotaSource,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._source = source
        self._wall_clock = wall_clock
        self._seed = Script(SEED_LUA)
        self._seeding: dict[str, asyncio.Future[None]] = {}

    def key(self, subject: Subject, window: Window) -> str:
        """``<prefix>:<kind>:<name>:quota:<day|month>:<id>``."""
        return f"{self._prefix}:{subject.kind}:{subject.name}:quota:{window.period}:{window.id}"

    def of(self, subjects: Sequence[Subject], now: datetime) -> AdmitWindows:
        """The windows an admission at ``now`` counts in, with their tokens and requests quotas
        (unlimited where the subject has none: the window counts them all the same)."""
        windows: AdmitWindows = []
        for index, subject in enumerate(subjects):
            quotas = subject.limits.quotas
            if not quotas:
                continue
            for period in subject.limits.periods:
                window = window_of(period, now)
                spec = WindowSpec(self.key(subject, window), MAX_QUOTA, MAX_QUOTA)
                for quota in quotas:
                    if quota.period is period and quota.metric is QuotaMetric.TOKENS:
                        spec.tokens_limit = quota.limit
                    elif quota.period is period and quota.metric is QuotaMetric.REQUESTS:
                        spec.requests_limit = quota.limit
                windows.append((index, window, spec))
        return windows

    async def seed(self, windows: Sequence[tuple[Subject, Window]]) -> None:
        """Load the windows Redis does not hold from the quota source (once per window in this
        gateway, however many requests wait; across gateways the first seed wins).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        for subject, window in windows:
            key = self.key(subject, window)
            seeding = self._seeding.get(key)
            if seeding is None:
                seeding = asyncio.ensure_future(self._seed_one(key, subject, window))
                self._seeding[key] = seeding
                seeding.add_done_callback(partial(forget_pending, self._seeding, key))
            await asyncio.shield(seeding)

    async def _seed_one(self, key: str, subject: Subject, window: Window) -> None:
        try:
            if await self._client.execute("EXISTS", key):
                return
        except RedisError as exc:
            raise unavailable(exc) from None
        used = await self._source.consumed(subject.kind, subject.name, window)
        left_ms = int((window.end - self._wall_clock()).total_seconds() * 1000)
        ttl_ms = max(0, left_ms) + _WINDOW_KEPT_AFTER_END_MS
        args: list[Any] = [repr(used.tokens), repr(used.requests), repr(used.audio_seconds)]
        try:
            await self._client.run_script(self._seed, [key], [*args, repr(used.images), ttl_ms])
        except RedisError as exc:
            raise unavailable(exc) from None
