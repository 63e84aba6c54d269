"""Rate limits shared by several gateways: the in-process limiter's rules, kept in Redis.

The semantics are those of :class:`lmaas.gateway.limits.InProcessLimiter` (requests and tokens
per minute are token buckets refilling at limit/60 per second; tokens are reserved at admission
and settled at the end; concurrency is counted while a request runs; the key and its tenant are
checked, then taken from, all or nothing). What changes is where the state lives and what makes
admission atomic:

* Each check-and-take is **one Lua script** run by Redis (``register_script``: ``EVALSHA``,
  loaded again by redis-py if Redis forgot it). Redis runs one script at a time, so N gateways
  admitting at once can never pass a limit together, and a refused request takes nothing.
* Time is Redis's clock (``TIME`` inside the script), so the gateways' clocks do not matter.
* Concurrency slots are **leases**: a sorted set per subject whose members are the admitted
  requests, scored by when their lease ends. Admission first drops ended leases, then counts.
  While a request runs its gateway refreshes the lease (every third of ``lease_ttl_s``); when it
  ends the lease is removed. A gateway that dies (SIGKILL, power cut, a partition) stops
  refreshing, and its slots come back by themselves within ``lease_ttl_s``.
* Buckets are hashes (``level``, ``ts``, ``cap``) that expire once they would be full again, so
  idle keys cost Redis nothing.

Redis down means **closed**: admission fails with 503 (``ServiceUnavailableError``, retryable)
rather than serving past limits nobody can check. Settling is best effort: if it fails, the
lease still expires and the unused reservation simply is not refunded (conservative).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lmaas.core.errors import RateLimitError, ServiceUnavailableError
from lmaas.gateway.limits import Subject, rate_limit_error

_log = logging.getLogger(__name__)

_KEYS_PER_SUBJECT = 3
_ARGS_PER_SUBJECT = 3

# A bucket hash: level (float, may be negative), ts (ms of the last refill), cap (the limit it
# was built for: a changed limit keeps what was used, as in process).
_BUCKET_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function load(key, cap, now)
  local h = redis.call('HMGET', key, 'level', 'ts', 'cap')
  local level, ts, old = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if level == nil or ts == nil or old == nil then return cap end
  if old ~= cap then level = cap - (old - level) end
  return math.min(cap, level + math.max(0, now - ts) * cap / 60000)
end
local function save(key, level, cap, now)
  redis.call('HSET', key, 'level', tostring(level), 'ts', now, 'cap', cap)
  redis.call('PEXPIRE', key, math.ceil((cap - level) * 60000 / cap) + 60000)
end
"""

ADMIT_LUA = (
    _BUCKET_LUA
    + """
-- KEYS: per subject: requests bucket, tokens bucket, leases (sorted set)
-- ARGV: tokens, lease id, lease ttl ms, then per subject: rpm, tpm, max_concurrent (0: none)
-- Returns {1} when admitted, else {0, subject index (0-based), reason, wait ms, in flight}
-- with reason 1 concurrency, 2 rpm, 3 larger than tpm, 4 tpm.
local now = now_ms()
local tokens = tonumber(ARGV[1])
local lease, ttl = ARGV[2], tonumber(ARGV[3])
local n = #KEYS / 3
local levels = {}
for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]),
    tonumber(ARGV[6 + 3 * i])
  if conc > 0 then
    local leases = KEYS[3 + 3 * i]
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    local in_flight = redis.call('ZCARD', leases)
    if in_flight >= conc then return {0, i, 1, 1000, in_flight} end
  end
  if rpm > 0 then
    local level = load(KEYS[1 + 3 * i], rpm, now)
    levels[1 + 3 * i] = level
    if level < 1 then return {0, i, 2, math.ceil((1 - level) * 60000 / rpm), 0} end
  end
  if tpm > 0 then
    if tokens > tpm then return {0, i, 3, 60000, 0} end
    local level = load(KEYS[2 + 3 * i], tpm, now)
    levels[2 + 3 * i] = level
    if level < tokens then return {0, i, 4, math.ceil((tokens - level) * 60000 / tpm), 0} end
  end
end
for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]),
    tonumber(ARGV[6 + 3 * i])
  if rpm > 0 then save(KEYS[1 + 3 * i], levels[1 + 3 * i] - 1, rpm, now) end
  if tpm > 0 then save(KEYS[2 + 3 * i], levels[2 + 3 * i] - tokens, tpm, now) end
  if conc > 0 then
    redis.call('ZADD', KEYS[3 + 3 * i], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[3 + 3 * i], ttl * 2)
  end
end
return {1}
"""
)

SETTLE_LUA = (
    _BUCKET_LUA
    + """
-- KEYS: per subject: tokens bucket, leases.  ARGV: refund tokens (may be negative), lease id,
-- then per subject: tpm (0: none), held a lease (0/1).
local now = now_ms()
local refund, lease = tonumber(ARGV[1]), ARGV[2]
for i = 0, #KEYS / 2 - 1 do
  local tpm, held = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  if held > 0 then redis.call('ZREM', KEYS[2 + 2 * i], lease) end
  if tpm > 0 and refund ~= 0 then
    local level = load(KEYS[1 + 2 * i], tpm, now)
    save(KEYS[1 + 2 * i], math.min(tpm, level + refund), tpm, now)
  end
end
return 1
"""
)

REFRESH_LUA = """
-- KEYS: lease sets; ARGV: ttl ms, then the lease id held in each set (same order).
-- XX: a lease that already ended (this gateway stalled past its ttl) is not brought back, so a
-- refresh can never push a subject past its limit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return #KEYS
"""

_REASONS = {1: "concurrency", 2: "rpm", 3: "too_large", 4: "tpm"}


class RedisAdmission:
    """One admitted request's hold; :meth:`finish` settles it (once), without awaiting: the
    settle runs as its own task, so it also happens when the request's task is being cancelled
    (a cancelled scope would cancel any ``await`` made in its ``finally``)."""

    __slots__ = ("_done", "_held", "_lease", "_limiter", "_subjects", "reserved_tokens")

    def __init__(
        self,
        limiter: RedisLimiter,
        subjects: Sequence[Subject],
        lease: str,
        held: list[str],
        tokens: int,
    ) -> None:
        self._limiter = limiter
        self._subjects = subjects
        self._lease = lease
        self._held = held
        self._done = False
        self.reserved_tokens = tokens

    def finish(self, used_tokens: int) -> None:
        """Release the concurrency leases and settle the reservation to ``used_tokens``."""
        if self._done:
            return
        self._done = True
        self._limiter.release(self, self.reserved_tokens - used_tokens)


class RedisLimiter:
    """Token buckets and concurrency leases per subject, in Redis, shared by every gateway that
    uses the same Redis and ``prefix``.

    Args:
        client: An async Redis client (``redis.asyncio.Redis``); the limiter owns it.
        prefix: Namespace of the limiter's keys (tests use one per test).
        lease_ttl_s: How long a concurrency slot outlives a gateway that stopped refreshing it.
    """

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "lmaas:limits", lease_ttl_s: float = 15.0
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, not {lease_ttl_s}")
        self._client = client
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self._admit = client.register_script(ADMIT_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._refresh = client.register_script(REFRESH_LUA)
        self._live: dict[str, list[str]] = {}
        """lease id → the lease sets it is in, for the refresher."""
        self._refresher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "lmaas:limits", lease_ttl_s: float = 15.0
    ) -> RedisLimiter:
        """A limiter on its own connection pool to ``url`` (``redis://host:port/db``)."""
        client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        return cls(client, prefix=prefix, lease_ttl_s=lease_ttl_s)

    def _keys(self, subject: Subject) -> tuple[str, str, str]:
        base = f"{self.prefix}:{subject.kind}:{subject.name}"
        return f"{base}:rpm", f"{base}:tpm", f"{base}:leases"

    async def admit_async(self, subjects: Sequence[Subject], tokens: int) -> RedisAdmission:
        """Admit one request that may use ``tokens`` against every subject's limits, atomically
        across every gateway.

        Raises:
            RateLimitError: a limit is reached (nothing is taken), with the seconds to wait.
            ServiceUnavailableError: Redis cannot be reached (503: limits fail closed).
        """
        keys: list[str] = []
        args: list[Any] = [tokens, uuid.uuid4().hex, max(1, round(self.lease_ttl_s * 1000))]
        held: list[str] = []
        for subject in subjects:
            keys.extend(self._keys(subject))
            limits = subject.limits
            args += [limits.rpm or 0, limits.tpm or 0, limits.max_concurrent or 0]
            if limits.max_concurrent is not None:
                held.append(self._keys(subject)[2])
        try:
            reply = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            raise ServiceUnavailableError(
                f"the rate limiter's Redis is unreachable ({type(exc).__name__}); retry later",
                retry_after_s=1.0,
            ) from None
        if int(reply[0]) != 1:
            _, index, reason, wait_ms, in_flight = (int(v) for v in reply)
            raise _refusal(subjects[index], _REASONS[reason], wait_ms, in_flight, tokens)
        lease = str(args[1])
        admission = RedisAdmission(self, subjects, lease, held, tokens)
        if held:
            self._live[lease] = held
            self._ensure_refresher()
        return admission

    def release(self, admission: RedisAdmission, refund_tokens: int) -> None:
        """Settle an admission in the background (see :class:`RedisAdmission`)."""
        self._live.pop(admission._lease, None)
        keys: list[str] = []
        args: list[Any] = [refund_tokens, admission._lease]
        for subject in admission._subjects:
            _, tpm_key, leases_key = self._keys(subject)
            keys += [tpm_key, leases_key]
            args += [subject.limits.tpm or 0, 1 if leases_key in admission._held else 0]
        if not admission._held and refund_tokens == 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (interpreter shutdown): the leases expire by themselves
        task = loop.create_task(self._settle_quietly(keys, args))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle_quietly(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self._settle(keys=keys, args=args)
        except RedisError as exc:
            _log.warning("could not settle a rate-limit admission in Redis: %s", exc)

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def refresh_now(self) -> int:
        """Push the end of every live lease of this gateway ``lease_ttl_s`` ahead; returns how
        many leases were refreshed."""
        live = list(self._live.items())
        if not live:
            return 0
        keys = [key for _, sets in live for key in sets]
        args: list[Any] = [max(1, round(self.lease_ttl_s * 1000))]
        args += [lease for lease, sets in live for _ in sets]
        await self._refresh(keys=keys, args=args)
        return len(live)

    async def _refresh_forever(self) -> None:
        while self._live:
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await self.refresh_now()
            except RedisError as exc:
                _log.warning("could not refresh concurrency leases in Redis: %s", exc)

    async def wait_settled(self) -> None:
        """Wait for the settles :meth:`RedisAdmission.finish` started (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def aclose(self) -> None:
        """Finish pending settles, stop refreshing, close the connection pool."""
        await self.wait_settled()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self._client.aclose()


def _refusal(
    subject: Subject, reason: str, wait_ms: int, in_flight: int, tokens: int
) -> RateLimitError:
    return rate_limit_error(subject, reason, math.ceil(wait_ms / 1000), in_flight, tokens)
