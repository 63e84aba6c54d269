"""Rate limits shared by several gateways: the in-process limiter's rules, kept in Redis.

The semantics are those of :class:`lmaas.gateway.limits.InProcessLimiter` (requests and tokens
per minute are token buckets refilling at limit/60 per second; tokens are reserved at admission
and settled at the end; concurrency is counted while a request runs; the key and its tenant are
checked, then taken from, all or nothing). What changes is where the state lives and what makes
admission atomic (quotas per day or month too: :mod:`lmaas.gateway.quotas`):

* Each check-and-take is **one Lua script** run by Redis (``EVALSHA`` through the lean client
  of :mod:`lmaas.gateway.resp`, loaded again if Redis forgot it). Redis runs one script at a
  time, so N gateways admitting at once can never pass a limit together, and a refused
  request takes nothing.
* Time is Redis's clock (``TIME`` inside the script), so the gateways' clocks do not matter.
* Concurrency slots are **leases**: a sorted set per subject whose members are the admitted
  requests, scored by when their lease ends. Admission first drops ended leases, then counts.
  While a request runs its gateway refreshes the lease (every third of ``lease_ttl_s``); when it
  ends the lease is removed. A gateway that dies (SIGKILL, power cut, a partition) stops
  refreshing, and its slots come back by themselves within ``lease_ttl_s``.
* Buckets are hashes (``level``, ``ts``, ``cap``) that expire once they would be full again, so
  idle keys cost Redis nothing.
* Quota windows are hashes (``tokens``, ``requests``, ``audio_seconds``, ``images``) per subject
  and UTC day or month, kept a day past their period. The admission script refuses to count on
  a window Redis does not hold (a new period, a quota just added, a Redis that lost its data):
  the gateway then loads the window from the usage table (the durable truth), writes it only if
  still absent (``SEED_LUA``: the first gateway wins), and admits again.

Redis down means **closed**: admission fails with 503 (``ServiceUnavailableError``, retryable)
rather than serving past limits nobody can check. Settling is best effort: if it fails, the
lease still expires and the unused reservation simply is not refunded (conservative). A settle
is not awaited: it is written after the request's response, with the next admission or within
20 ms (``RespClient.defer_s``), so a slot or a refund comes back at most that much later
(under load most settles ride with an admission: one write, one wake-up of Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from lmaas.core.errors import RateLimitError, ServiceUnavailableError
from lmaas.gateway.limits import Subject, forget_pending, rate_limit_error
from lmaas.gateway.quotas import (
    NO_CHARGE,
    Charge,
    Quota,
    QuotaPeriod,
    QuotaSource,
    Window,
    ZeroSource,
    cost_of,
    quota_error,
    window_of,
)
from lmaas.gateway.resp import RedisError, RespClient, Script

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
-- KEYS: per subject: requests bucket, tokens bucket, leases (sorted set); then the quota
-- window hashes (fields tokens, requests, audio_seconds, images).
-- ARGV: tokens, lease id, lease ttl ms, subjects n, audio seconds, images, then per subject:
-- rpm, tpm, max_concurrent (0: none), then the number of quotas m and per quota: its window's
-- index in KEYS, its subject's index (0-based), metric, limit.
-- Returns {1} when admitted, else {0, subject index (0-based), reason, wait ms, detail}
-- with reason 1 concurrency (detail: in flight), 2 rpm, 3 larger than tpm, 4 tpm,
-- 5 a quota window is not loaded yet (detail: its index in KEYS), 6 a quota is used up
-- (wait: the quota's index, detail: the window's use in thousandths).
local now = now_ms()
local tokens = tonumber(ARGV[1])
local lease, ttl = ARGV[2], tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local cost = {tokens = tokens, requests = 1, audio_seconds = tonumber(ARGV[5]),
  images = tonumber(ARGV[6])}
local levels = {}
for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i]),
    tonumber(ARGV[9 + 3 * i])
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
local q = 7 + 3 * n
for j = 0, tonumber(ARGV[q]) - 1 do
  local k, si = tonumber(ARGV[q + 1 + 4 * j]), tonumber(ARGV[q + 2 + 4 * j])
  local metric, limit = ARGV[q + 3 + 4 * j], tonumber(ARGV[q + 4 + 4 * j])
  if redis.call('EXISTS', KEYS[k]) == 0 then return {0, si, 5, 0, k} end
  local used = tonumber(redis.call('HGET', KEYS[k], metric) or '0')
  local c = cost[metric]
  if used >= limit or used + c > limit then return {0, si, 6, j, math.floor(used * 1000)} end
end
for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i]),
    tonumber(ARGV[9 + 3 * i])
  if rpm > 0 then save(KEYS[1 + 3 * i], levels[1 + 3 * i] - 1, rpm, now) end
  if tpm > 0 then save(KEYS[2 + 3 * i], levels[2 + 3 * i] - tokens, tpm, now) end
  if conc > 0 then
    redis.call('ZADD', KEYS[3 + 3 * i], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[3 + 3 * i], ttl * 2)
  end
end
for k = 3 * n + 1, #KEYS do
  for metric, c in pairs(cost) do
    if c ~= 0 then redis.call('HINCRBYFLOAT', KEYS[k], metric, c) end
  end
end
return {1}
"""
)

SETTLE_LUA = (
    _BUCKET_LUA
    + """
-- KEYS: per subject: tokens bucket, leases; then quota window hashes.
-- ARGV: refund tokens (may be negative), lease id, subjects n, audio seconds to add (may be
-- negative), then per subject: tpm (0: none), held a lease (0/1).
local now = now_ms()
local refund, lease = tonumber(ARGV[1]), ARGV[2]
local n, audio = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 0, n - 1 do
  local tpm, held = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  if held > 0 then redis.call('ZREM', KEYS[2 + 2 * i], lease) end
  if tpm > 0 and refund ~= 0 then
    local level = load(KEYS[1 + 2 * i], tpm, now)
    save(KEYS[1 + 2 * i], math.min(tpm, level + refund), tpm, now)
  end
end
for k = 2 * n + 1, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    if refund ~= 0 then redis.call('HINCRBYFLOAT', KEYS[k], 'tokens', -refund) end
    if audio ~= 0 then redis.call('HINCRBYFLOAT', KEYS[k], 'audio_seconds', audio) end
  end
end
return 1
"""
)

SEED_LUA = """
-- KEYS: quota window hashes; ARGV per key: tokens, requests, audio_seconds, images, time to
-- live (ms). A window that exists is left alone: only the first seeder writes it.
local seeded = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local b = 5 * (i - 1)
    redis.call('HSET', KEYS[i], 'tokens', ARGV[b + 1], 'requests', ARGV[b + 2],
      'audio_seconds', ARGV[b + 3], 'images', ARGV[b + 4])
    redis.call('PEXPIRE', KEYS[i], ARGV[b + 5])
    seeded = seeded + 1
  end
end
return seeded
"""

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
_UNSEEDED = 5
_QUOTA = 6
_SEED_ATTEMPTS = 3
_WINDOW_KEPT_AFTER_END_MS = 86_400_000
"""A window's hash outlives its period by a day (then Redis drops it)."""


class RedisAdmission:
    """One admitted request's hold; :meth:`finish` settles it (once), without awaiting: the
    settle runs as its own task, so it also happens when the request's task is being cancelled
    (a cancelled scope would cancel any ``await`` made in its ``finally``)."""

    __slots__ = (
        "_charge",
        "_done",
        "_held",
        "_lease",
        "_limiter",
        "_subjects",
        "_windows",
        "reserved_tokens",
    )

    def __init__(
        self,
        limiter: RedisLimiter,
        subjects: Sequence[Subject],
        lease: str,
        held: list[str],
        tokens: int,
        windows: list[str],
        charge: Charge,
    ) -> None:
        self._limiter = limiter
        self._subjects = subjects
        self._lease = lease
        self._held = held
        self._windows = windows
        self._charge = charge
        self._done = False
        self.reserved_tokens = tokens

    def finish(self, used_tokens: int, audio_seconds: float | None = None) -> None:
        """Release the concurrency leases and settle the reservation to ``used_tokens`` (and
        the audio seconds charged to the worker's measure, when given)."""
        if self._done:
            return
        self._done = True
        extra_audio = 0.0 if audio_seconds is None else audio_seconds - self._charge.audio_seconds
        self._limiter.release(self, self.reserved_tokens - used_tokens, extra_audio)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RedisLimiter:
    """Token buckets, concurrency leases and quota windows per subject, in Redis, shared by
    every gateway that uses the same Redis and ``prefix``.

    Args:
        client: The Redis connection (:class:`~lmaas.gateway.resp.RespClient`); the limiter
            owns it.
        prefix: Namespace of the limiter's keys (tests use one per test).
        lease_ttl_s: How long a concurrency slot outlives a gateway that stopped refreshing it.
        quota_source: Where a quota window Redis does not hold yet is loaded from (the usage
            table); without one, such windows start empty.
        wall_clock: Current UTC time: which day and month the quota windows are.
    """

    def __init__(
        self,
        client: RespClient,
        *,
        prefix: str = "lmaas:limits",
        lease_ttl_s: float = 15.0,
        quota_source: QuotaSource | None = None,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, not {lease_ttl_s}")
        self._client = client
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self._source: QuotaSource = quota_source or ZeroSource()
        self._wall_clock = wall_clock
        self._admit = Script(ADMIT_LUA)
        self._settle = Script(SETTLE_LUA)
        self._seed = Script(SEED_LUA)
        self._refresh = Script(REFRESH_LUA)
        self._lease_prefix = f"{uuid.uuid4().hex[:16]}-"
        self._lease_numbers = itertools.count()
        """Lease ids: this limiter's random prefix and a counter (a uuid4 per request cost
        more than the rest of the admission's arguments)."""
        self._live: dict[str, list[str]] = {}
        """lease id → the lease sets it is in, for the refresher."""
        self._refresher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._seeding: dict[str, asyncio.Future[None]] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "lmaas:limits",
        lease_ttl_s: float = 15.0,
        quota_source: QuotaSource | None = None,
    ) -> RedisLimiter:
        """A limiter on its own connection pool to ``url`` (``redis://host:port/db``)."""
        client = RespClient.from_url(url, timeout_s=5.0, connect_timeout_s=5.0)
        return cls(client, prefix=prefix, lease_ttl_s=lease_ttl_s, quota_source=quota_source)

    def _keys(self, subject: Subject) -> tuple[str, str, str]:
        base = f"{self.prefix}:{subject.kind}:{subject.name}"
        return f"{base}:rpm", f"{base}:tpm", f"{base}:leases"

    def window_key(self, subject: Subject, window: Window) -> str:
        """The hash of one subject's quota window: ``<prefix>:<kind>:<name>:quota:<day|month>:
        <id>``."""
        return f"{self.prefix}:{subject.kind}:{subject.name}:quota:{window.period}:{window.id}"

    async def admit_async(
        self, subjects: Sequence[Subject], tokens: int, charge: Charge = NO_CHARGE
    ) -> RedisAdmission:
        """Admit one request that may use ``tokens`` (and ``charge``) against every subject's
        limits and quotas, atomically across every gateway. A quota window Redis does not hold
        yet is loaded from the quota source first (then the admission runs again).

        Raises:
            RateLimitError: a limit is reached (nothing is taken), with the seconds to wait.
            QuotaExceededError: a quota is used up; ``retry_after_s`` runs to the period's end.
            ServiceUnavailableError: Redis cannot be reached (503: limits fail closed).
        """
        now = self._wall_clock()
        lease = f"{self._lease_prefix}{next(self._lease_numbers)}"
        keys: list[str] = []
        args: list[Any] = [tokens, lease, max(1, round(self.lease_ttl_s * 1000)), len(subjects)]
        args += [repr(float(charge.audio_seconds)), charge.images]
        held: list[str] = []
        for subject in subjects:
            keys.extend(self._keys(subject))
            limits = subject.limits
            args += [limits.rpm or 0, limits.tpm or 0, limits.max_concurrent or 0]
            if limits.max_concurrent is not None:
                held.append(self._keys(subject)[2])
        windows: list[tuple[Subject, Window]] = []
        quotas: list[tuple[int, Quota]] = []
        quota_args: list[Any] = []
        for index, subject in enumerate(subjects):
            slots: dict[QuotaPeriod, int] = {}
            for period in subject.limits.periods:
                window = window_of(period, now)
                keys.append(self.window_key(subject, window))
                windows.append((subject, window))
                slots[period] = len(keys)  # 1-based, as Lua indexes KEYS
            for quota in subject.limits.quotas:
                quota_args += [slots[quota.period], index, quota.metric.value, repr(quota.limit)]
                quotas.append((index, quota))
        args += [len(quotas), *quota_args]
        for _ in range(_SEED_ATTEMPTS):
            reply = await self._run(self._admit, keys, args)
            if int(reply[0]) == 1:
                break
            _, index, reason, wait_ms, detail = (int(v) for v in reply)
            if reason == _UNSEEDED:
                await self._seed_windows(windows)
                continue
            if reason == _QUOTA:
                _, quota = quotas[wait_ms]
                cost = cost_of(quota.metric, tokens, charge)
                raise quota_error(subjects[index].label, quota, detail / 1000, cost, now)
            raise _refusal(subjects[index], _REASONS[reason], wait_ms, detail, tokens)
        else:
            raise ServiceUnavailableError(
                "the quota windows could not be loaded into Redis; retry later", retry_after_s=1.0
            )
        window_keys = [self.window_key(s, w) for s, w in windows]
        admission = RedisAdmission(self, subjects, lease, held, tokens, window_keys, charge)
        if held:
            self._live[lease] = held
            self._ensure_refresher()
        return admission

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.run_script(script, keys, args)
        except RedisError as exc:
            raise ServiceUnavailableError(
                f"the rate limiter's Redis is unreachable ({type(exc).__name__}); retry later",
                retry_after_s=1.0,
            ) from None

    async def _seed_windows(self, windows: list[tuple[Subject, Window]]) -> None:
        """Load the windows Redis does not hold from the quota source (once per window in this
        gateway, however many requests wait; across gateways the first seed wins)."""
        for subject, window in windows:
            key = self.window_key(subject, window)
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
            raise ServiceUnavailableError(
                f"the rate limiter's Redis is unreachable ({type(exc).__name__}); retry later",
                retry_after_s=1.0,
            ) from None
        used = await self._source.consumed(subject.kind, subject.name, window)
        left_ms = int((window.end - self._wall_clock()).total_seconds() * 1000)
        ttl_ms = max(0, left_ms) + _WINDOW_KEPT_AFTER_END_MS
        values = [repr(used.tokens), repr(used.requests), repr(used.audio_seconds)]
        await self._run(self._seed, [key], [*values, repr(used.images), ttl_ms])

    def release(self, admission: RedisAdmission, refund_tokens: int, audio: float = 0.0) -> None:
        """Settle an admission in the background (see :class:`RedisAdmission`)."""
        self._live.pop(admission._lease, None)
        keys: list[str] = []
        subjects = admission._subjects
        args: list[Any] = [refund_tokens, admission._lease, len(subjects), repr(float(audio))]
        for subject in subjects:
            _, tpm_key, leases_key = self._keys(subject)
            keys += [tpm_key, leases_key]
            args += [subject.limits.tpm or 0, 1 if leases_key in admission._held else 0]
        keys += admission._windows
        if not admission._held and refund_tokens == 0 and audio == 0:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (interpreter shutdown): the leases expire by themselves
        settle = self._client.run_script_nowait(self._settle, keys, args)
        self._pending.add(settle)
        settle.add_done_callback(self._settled)

    def _settled(self, settle: asyncio.Future[Any]) -> None:
        self._pending.discard(settle)
        if settle.cancelled():
            return
        exc = settle.exception()
        if exc is not None:
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
        await self._client.run_script(self._refresh, keys, args)
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
