"""The Lua scripts of the Redis limiter (:mod:`lmaas.gateway.redis_limits`) and of its local
credit (:mod:`lmaas.gateway.redis_credit`).

Redis runs one script at a time, so each script is one atomic check-and-take however many
gateways run it at once. Time is Redis's (``TIME``), so the gateways' clocks do not matter.

Key layout under the limiter's prefix, per subject (``key``/``tenant`` and its name):

* ``...:rpm``, ``...:tpm``: a **bucket** hash: ``level`` (may be negative), ``ts`` (ms of the last
  refill), ``cap`` (the limit it was built for: a changed limit keeps what was used), and per
  gateway holding credit: ``h:<gateway>`` (units) and ``x:<gateway>`` (ms when that credit
  ends). Credit is taken from ``level``, and a refill never lifts ``level`` above ``cap`` minus
  the credit held, so the level plus every credit never exceeds the limit: credit is exactly
  admissions made in advance. Expired credit is dropped (counted as used: it refills from then).
* ``...:leases``: a sorted set of concurrency leases scored by when each ends (a request's lease,
  or a slot a gateway holds as credit: ``<gateway>-c<n>``).
* ``...:quota:<day|month>:<id>``: a quota **window** hash (``tokens``, ``requests``,
  ``audio_seconds``, ``images``; credit is counted in them as used), and per gateway holding
  credit ``h:<gateway>:<metric>``, so that a credit given back is never subtracted from a
  window that does not count it (a window Redis lost and loaded again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmaas.gateway.limits import Subject
from lmaas.gateway.quotas import Charge, Quota, Window
from lmaas.gateway.redis_credit import Plan, WindowSpec

BUCKET_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The bucket's level now (refilled), and the most it may hold: its cap less the credit the
-- gateways hold in it (credit whose time ended is dropped).
local function load(key, cap, now)
  local h = redis.call('HGETALL', key)
  local f = {}
  for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
  local held = 0
  for name, value in pairs(f) do
    if string.sub(name, 1, 2) == 'x:' then
      local id = string.sub(name, 3)
      if tonumber(value) <= now then
        redis.call('HDEL', key, name, 'h:' .. id)
      else
        held = held + (tonumber(f['h:' .. id]) or 0)
      end
    end
  end
  local level, ts, old = tonumber(f['level']), tonumber(f['ts']), tonumber(f['cap'])
  if level == nil or ts == nil or old == nil then return cap - held, cap - held end
  if old ~= cap then level = cap - (old - level) end
  return math.min(cap - held, level + math.max(0, now - ts) * cap / 60000), cap - held
end
local function save(key, level, cap, now)
  redis.call('HSET', key, 'level', tostring(level), 'ts', now, 'cap', cap)
  redis.call('PEXPIRE', key, math.ceil((cap - level) * 60000 / cap) + 60000)
end
"""

ADMIT_LUA = (
    BUCKET_LUA
    + """
-- KEYS: per subject: requests bucket, tokens bucket, leases (sorted set); then the quota
-- window hashes (fields tokens, requests, audio_seconds, images).
-- ARGV: tokens, lease id, lease ttl ms, subjects n, audio seconds, images, then per subject:
-- rpm, tpm, tokens covered by the gateway's credit, max_concurrent (0: none, or covered by
-- credit), then the number of quotas m and per quota: its window's index in KEYS, its
-- subject's index (0-based), metric, limit; then per window: tokens and requests covered by
-- the gateway's credit.
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
  local b = 7 + 4 * i
  local rpm, tpm = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  local need, conc = tokens - tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
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
    if need > 0 then
      local level = load(KEYS[2 + 3 * i], tpm, now)
      levels[2 + 3 * i] = level
      if level < need then return {0, i, 4, math.ceil((need - level) * 60000 / tpm), 0} end
    end
  end
end
local q = 7 + 4 * n
local m = tonumber(ARGV[q])
local w = q + 1 + 4 * m
local function covered(k, metric)
  local b = w + 2 * (k - 3 * n - 1)
  if metric == 'tokens' then return tonumber(ARGV[b]) end
  if metric == 'requests' then return tonumber(ARGV[b + 1]) end
  return 0
end
for j = 0, m - 1 do
  local k, si = tonumber(ARGV[q + 1 + 4 * j]), tonumber(ARGV[q + 2 + 4 * j])
  local metric, limit = ARGV[q + 3 + 4 * j], tonumber(ARGV[q + 4 + 4 * j])
  if redis.call('EXISTS', KEYS[k]) == 0 then return {0, si, 5, 0, k} end
  local c = cost[metric] - covered(k, metric)
  if c > 0 or cost[metric] == 0 then
    local used = tonumber(redis.call('HGET', KEYS[k], metric) or '0')
    if used >= limit or used + c > limit then return {0, si, 6, j, math.floor(used * 1000)} end
  end
end
for i = 0, n - 1 do
  local b = 7 + 4 * i
  local rpm, tpm = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  local need, conc = tokens - tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if rpm > 0 then save(KEYS[1 + 3 * i], levels[1 + 3 * i] - 1, rpm, now) end
  if tpm > 0 and need > 0 then save(KEYS[2 + 3 * i], levels[2 + 3 * i] - need, tpm, now) end
  if conc > 0 then
    redis.call('ZADD', KEYS[3 + 3 * i], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[3 + 3 * i], ttl * 2)
  end
end
for k = 3 * n + 1, #KEYS do
  for metric, c in pairs(cost) do
    c = c - covered(k, metric)
    if c ~= 0 then redis.call('HINCRBYFLOAT', KEYS[k], metric, c) end
  end
end
return {1}
"""
)

SETTLE_LUA = (
    BUCKET_LUA
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
    local level, room = load(KEYS[1 + 2 * i], tpm, now)
    save(KEYS[1 + 2 * i], math.min(room, level + refund), tpm, now)
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
-- Returns the (1-based) indexes of the leases the sets no longer hold: XX, a lease that already
-- ended (this gateway stalled past its ttl) is not brought back, so a refresh can never push a
-- subject past its limit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local gone = {}
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[i + 1]) == 0
    and not redis.call('ZSCORE', KEYS[i], ARGV[i + 1]) then
    gone[#gone + 1] = i
  end
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return gone
"""

CREDIT_LUA = (
    BUCKET_LUA
    + """
-- Take, renew or give back the credit of one gateway (see redis_credit.py).
-- KEYS: one per account: a bucket hash, a quota window hash or a lease set.
-- ARGV: gateway id, credit ttl ms, lease ttl ms, then 6 per account: kind (1 bucket, 2 window,
-- 3 lease set), limit, claim (what the gateway still holds there; for a lease set, the number
-- of its first new member), want (units to take; -1: give back what is held), tokens refunded
-- by settles since the last script (as SETTLE_LUA refunds them), metric (window) or member
-- prefix (lease set).
-- Returns 2 per account: units granted, and how much of the claim Redis still counts as the
-- gateway's (less than the claim: the credit ended, or Redis lost it).
local now = now_ms()
local id, ttl, lease_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS do
  local key, b = KEYS[i], 3 + 6 * (i - 1)
  local kind, limit = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local claim, want = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local refund, extra = tonumber(ARGV[b + 5]), ARGV[b + 6]
  local granted, kept = 0, 0
  if kind == 1 then
    local level, room = load(key, limit, now)
    local mine = tonumber(redis.call('HGET', key, 'h:' .. id) or '0')
    kept = math.min(mine, claim)
    if refund ~= 0 then level = math.min(room + mine - kept, level + refund) end
    if want < 0 then
      level = level + kept
      redis.call('HDEL', key, 'h:' .. id, 'x:' .. id)
    else
      granted = math.max(0, math.min(want, math.floor(level)))
      level = level - granted
      if kept + granted > 0 then
        redis.call('HSET', key, 'h:' .. id, kept + granted, 'x:' .. id, now + ttl)
      else
        redis.call('HDEL', key, 'h:' .. id, 'x:' .. id)
      end
    end
    save(key, level, limit, now)
  elseif kind == 2 then
    if redis.call('EXISTS', key) == 1 then
      local field = 'h:' .. id .. ':' .. extra
      kept = math.min(tonumber(redis.call('HGET', key, field) or '0'), claim)
      if refund ~= 0 then redis.call('HINCRBYFLOAT', key, extra, -refund) end
      if want < 0 then
        if kept > 0 then redis.call('HINCRBYFLOAT', key, extra, -kept) end
        redis.call('HDEL', key, field)
      else
        local used = tonumber(redis.call('HGET', key, extra) or '0')
        granted = math.max(0, math.min(want, math.floor(limit - used)))
        if granted > 0 then redis.call('HINCRBYFLOAT', key, extra, granted) end
        if kept + granted > 0 then
          redis.call('HSET', key, field, kept + granted)
        else
          redis.call('HDEL', key, field)
        end
      end
    end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    granted = math.max(0, math.min(want, limit - redis.call('ZCARD', key)))
    for j = 0, granted - 1 do
      redis.call('ZADD', key, now + lease_ttl, extra .. (claim + j))
    end
    if granted > 0 then redis.call('PEXPIRE', key, lease_ttl * 2) end
  end
  out[#out + 1] = granted
  out[#out + 1] = kept
end
return out
"""
)


AdmitWindows = list[tuple[int, Window, WindowSpec]]
"""(subject index, window, its hash and tokens/requests limits) of one admission."""


@dataclass(slots=True, frozen=True)
class AdmitCommand:
    """One admission script's keys and arguments; the lease sets the request's lease goes
    into; the quotas in the order the script numbers them."""

    keys: list[str]
    args: list[Any]
    held: list[str]
    quotas: list[Quota]


def admit_command(
    subjects: Sequence[Subject],
    keys: list[tuple[str, str, str]],
    windows: AdmitWindows,
    tokens: int,
    charge: Charge,
    lease: str,
    lease_ttl_ms: int,
    plan: Plan | None,
) -> AdmitCommand:
    """The admission script's keys and arguments (see ``ADMIT_LUA``)."""
    flat: list[str] = []
    args: list[Any] = [tokens, lease, lease_ttl_ms, len(subjects)]
    args += [repr(float(charge.audio_seconds)), charge.images]
    held: list[str] = []
    for index, (subject, subject_keys) in enumerate(zip(subjects, keys, strict=True)):
        flat.extend(subject_keys)
        limits = subject.limits
        rpm = 0 if plan is not None and plan.rpm[index] else limits.rpm or 0
        covered_tokens = plan.tpm[index] if plan is not None else 0
        conc = 0 if plan is not None and plan.slots[index] else limits.max_concurrent or 0
        args += [rpm, limits.tpm or 0, covered_tokens, conc]
        if conc:
            held.append(subject_keys[2])
    quota_args: list[Any] = []
    quotas: list[Quota] = []
    for slot, (index, window, spec) in enumerate(windows, start=len(flat) + 1):
        flat.append(spec.key)  # slot: 1-based, as Lua indexes KEYS
        for quota in subjects[index].limits.quotas:
            if quota.period is window.period:
                quota_args += [slot, index, quota.metric.value, repr(quota.limit)]
                quotas.append(quota)
    args += [len(quotas), *quota_args]
    for position in range(len(windows)):
        args += plan.windows[position] if plan is not None else (0, 0)
    return AdmitCommand(flat, args, held, quotas)


def settle_command(
    subjects: Sequence[Subject],
    keys: Sequence[tuple[str, str, str]],
    lease: str,
    held: list[str],
    windows: list[str],
    refund_tokens: int,
    audio: float,
) -> tuple[list[str], list[Any]]:
    """The settle script's keys and arguments (see ``SETTLE_LUA``): ``held``, the lease sets
    the request's ``lease`` is in; ``windows``, the window hashes it counted in."""
    flat: list[str] = []
    args: list[Any] = [refund_tokens, lease, len(subjects), repr(float(audio))]
    for subject, (_, tpm_key, leases_key) in zip(subjects, keys, strict=True):
        flat += [tpm_key, leases_key]
        args += [subject.limits.tpm or 0, 1 if leases_key in held else 0]
    return flat + windows, args
