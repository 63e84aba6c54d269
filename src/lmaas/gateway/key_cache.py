"""Checking a presented API key: the short-lived cache of key records behind every request.

Keys are checked on every request, so :class:`KeyCache` keeps key records (never secrets) in
memory for ``ttl_s``: a hit costs one SHA-256 and one constant-time compare; a miss reads the
DB on a worker thread (the event loop never waits on the DB), once per key however many
requests miss it meanwhile. The owner (:class:`~lmaas.gateway.service.GovernanceService`)
calls :meth:`KeyCache.forget` after each change it makes, so that change applies at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial

import anyio.to_thread

from lmaas.core.errors import AuthenticationError
from lmaas.gateway.keys import Principal, key_matches, parse_key_id
from lmaas.gateway.limits import Limits, forget_pending
from lmaas.gateway.store import ApiKey

MAX_CACHED_KEYS = 10_000
INVALID_KEY = "invalid API key"

Found = tuple[ApiKey, Limits, float] | None
"""A key record as authentication reads it (with its tenant's limits and weight), or None."""


class KeyCache:
    """Turns presented keys into principals, with the cache described in the module docstring.

    Args:
        read: Reads one key's record by id (blocking; run on a worker thread).
        ttl_s: How long a record read is trusted (0: every request reads the DB).
        clock: Current UTC time, for expiry.
    """

    def __init__(
        self, read: Callable[[str], Found], *, ttl_s: float, clock: Callable[[], datetime]
    ) -> None:
        self._read_record = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, Found]] = {}
        self._reading: dict[str, asyncio.Future[Found]] = {}
        """Key records being read from the DB: requests that miss the cache meanwhile wait for
        the same read (one read per key per expiry, not one per request)."""
        self._generation = 0
        """Bumped by every :meth:`forget`: a read begun before it is not cached."""

    async def authenticate(self, secret: str) -> Principal:
        """The principal of a presented key.

        Raises:
            AuthenticationError: malformed, unknown, wrong, revoked or expired key.
        """
        key_id = parse_key_id(secret)
        if key_id is None:
            raise AuthenticationError(INVALID_KEY)
        return self._check(await self._lookup(key_id), secret)

    def authenticate_sync(self, secret: str) -> Principal:
        """:meth:`authenticate` without the cache, for callers outside an event loop."""
        key_id = parse_key_id(secret)
        if key_id is None:
            raise AuthenticationError(INVALID_KEY)
        return self._check(self._read_record(key_id), secret)

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached key records (one, or all) after a change."""
        self._generation += 1
        if key_id is None:
            self._cache.clear()
            self._reading.clear()
        else:
            self._cache.pop(key_id, None)
            self._reading.pop(key_id, None)

    def _check(self, found: Found, secret: str) -> Principal:
        if found is None or not key_matches(secret, found[0].key_sha256):
            raise AuthenticationError(INVALID_KEY)
        key, tenant_limits, tenant_weight = found
        status = key.status(self._clock())
        if status == "revoked":
            raise AuthenticationError(f"API key {key.prefix} has been revoked")
        if status == "expired":
            assert key.expires_at is not None
            raise AuthenticationError(
                f"API key {key.prefix} expired at {key.expires_at.isoformat(timespec='seconds')}"
            )
        return key.principal(tenant_limits, tenant_weight)

    async def _lookup(self, key_id: str) -> Found:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        if self._ttl_s <= 0:  # no cache: one DB read per request, as configured
            return await anyio.to_thread.run_sync(self._read_record, key_id)
        # Single flight: when an entry expires under load, every request arriving during the
        # read used to start its own read in a thread (a herd that slowed the loop further).
        reading = self._reading.get(key_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(key_id, now))
            self._reading[key_id] = reading
            reading.add_done_callback(partial(forget_pending, self._reading, key_id))
        return await asyncio.shield(reading)

    async def _read(self, key_id: str, now: float) -> Found:
        generation = self._generation
        found = await anyio.to_thread.run_sync(self._read_record, key_id)
        if generation == self._generation:  # else changed meanwhile: the read may be stale
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key_id] = (now, found)
        return found
