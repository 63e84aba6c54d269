"""Per-key and per-tenant rate limits, in process: requests/min, tokens/min, concurrency.

Quotas per day or month (:mod:`lmaas.gateway.quotas`) are checked and taken in the same step,
against per-window counters loaded from the usage table the first time a window is met.

Requests and tokens per minute are token buckets: a bucket holds up to the per-minute limit and
refills at limit/60 per second, so a quiet key may burst up to its limit, and a busy one is held
to the rate. Tokens are **reserved at admission** (an estimate of the prompt plus the most the
request may generate) and **settled** to the real count when the request ends: the difference
goes back into the bucket, or is taken out of it (a bucket may go below zero, and the next
requests wait for it to refill). Concurrency is a counter held until the request ends.

Admission checks every limit of the key and of its tenant, then takes from all of them, with no
``await`` in between: on one event loop it is atomic, so N concurrent requests can never be
admitted past a limit. A refused request takes nothing and gets :class:`RateLimitError` (429)
with the seconds until it would pass (``Retry-After``). Several gateways need a shared store:
:mod:`lmaas.gateway.redis_limits` keeps the same rules in Redis; this one holds for one process.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from lmaas.core.errors import InvalidRequestError, RateLimitError
from lmaas.gateway.quotas import (
    NO_CHARGE,
    Charge,
    Consumed,
    Quota,
    QuotaPeriod,
    QuotaSource,
    Window,
    ZeroSource,
    check_quotas,
    cost_of,
    over_quota,
    quota_error,
    window_of,
)

_SECONDS_PER_MINUTE = 60.0


@dataclass(slots=True, frozen=True)
class Limits:
    """Limits of one key or tenant; None means unlimited."""

    rpm: int | None = None
    """Requests per minute."""
    tpm: int | None = None
    """Tokens (prompt + generated) per minute."""
    max_concurrent: int | None = None
    """Requests in flight at once."""
    quotas: tuple[Quota, ...] = ()
    """Quotas per UTC day or month (tokens, requests, audio seconds, images)."""
    periods: tuple[QuotaPeriod, ...] = field(init=False, repr=False, compare=False)
    """The periods of the quotas (each once); computed once, as the admission path reads it
    several times per request."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "periods", tuple(dict.fromkeys(q.period for q in self.quotas)))

    @property
    def any(self) -> bool:
        return (
            self.rpm is not None
            or self.tpm is not None
            or self.max_concurrent is not None
            or bool(self.quotas)
        )

    def checked(self) -> Limits:
        """Raises: InvalidRequestError for a limit below 1 (None is unlimited)."""
        for param, value in (
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("max_concurrent", self.max_concurrent),
        ):
            if value is not None and not 1 <= value <= 1 << 40:
                raise InvalidRequestError(
                    f"{param} must be a positive integer (or absent: unlimited), not {value}",
                    param=param,
                )
        quotas = check_quotas(self.quotas)
        return Limits(self.rpm, self.tpm, self.max_concurrent, quotas)


NO_LIMITS = Limits()
"""Unlimited (a shared immutable default)."""


@dataclass(slots=True, frozen=True)
class Subject:
    """Who a limit applies to: ``key lmaas-<id>`` or ``tenant <name>`` (shown in errors)."""

    kind: str
    name: str
    limits: Limits

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(slots=True)
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / _SECONDS_PER_MINUTE
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_s(self, cost: float) -> float:
        if self.level >= cost:
            return 0.0
        return (cost - self.level) / (self.capacity / _SECONDS_PER_MINUTE)


@dataclass(slots=True)
class _State:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: int = 0
    limits: Limits = field(default_factory=Limits)


class Admission:
    """One admitted request's hold on its limits; :meth:`finish` settles it (once)."""

    __slots__ = ("_charge", "_done", "_limiter", "_states", "_windows", "reserved_tokens")

    def __init__(
        self,
        limiter: InProcessLimiter,
        states: list[_State],
        tokens: int,
        windows: list[Consumed],
        charge: Charge,
    ) -> None:
        self._limiter = limiter
        self._states = states
        self._windows = windows
        self._charge = charge
        self._done = False
        self.reserved_tokens = tokens

    def finish(self, used_tokens: int, audio_seconds: float | None = None) -> None:
        """Release the concurrency slots and settle the reservation to ``used_tokens`` (and
        the audio seconds charged to the worker's measure, when given)."""
        if self._done:
            return
        self._done = True
        self._limiter.settle(self._states, self.reserved_tokens - used_tokens)
        extra_audio = 0.0 if audio_seconds is None else audio_seconds - self._charge.audio_seconds
        for window in self._windows:
            window.tokens -= self.reserved_tokens - used_tokens
            window.audio_seconds += extra_audio


class Hold(Protocol):
    """An admitted request's hold on its limits (what every limiter's admission offers)."""

    reserved_tokens: int

    def finish(self, used_tokens: int, audio_seconds: float | None = None) -> None:
        """Release the concurrency slots and settle the reservation (once; never awaits)."""


class SharedLimiter(Protocol):
    """A limiter whose state lives outside the process (Redis): admission awaits I/O."""

    async def admit_async(
        self, subjects: Sequence[Subject], tokens: int, charge: Charge = NO_CHARGE
    ) -> Hold:
        """Raises: RateLimitError past a limit (nothing taken)."""

    async def aclose(self) -> None: ...


def forget_pending(pending: dict[Any, Any], slot: object, _done: object) -> None:
    pending.pop(slot, None)


def _utcnow() -> datetime:
    return datetime.now(UTC)


_WindowKey = tuple[str, str, QuotaPeriod]
"""(subject kind, subject name, period)."""


class InProcessLimiter:
    """Token buckets, in-flight counters and quota windows per subject, for one gateway process.

    Args:
        clock: Monotonic seconds (tests pass a fake one).
        wall_clock: Current UTC time, for the quota windows (tests pass a fake one).
        quota_source: Where a quota window met for the first time loads what was used in it
            (the usage table); without one, windows start empty.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], datetime] = _utcnow,
        quota_source: QuotaSource | None = None,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._source: QuotaSource = quota_source or ZeroSource()
        self._states: dict[tuple[str, str], _State] = {}
        self._windows: dict[_WindowKey, tuple[str, Consumed]] = {}
        self._loading: dict[tuple[_WindowKey, str], asyncio.Future[Consumed]] = {}

    def _state(self, subject: Subject, now: float) -> _State:
        key = (subject.kind, subject.name)
        state = self._states.get(key)
        if state is None or (state.limits is not subject.limits and state.limits != subject.limits):
            state = self._reconfigure(state, subject.limits, now)
            self._states[key] = state
            self._forget_unused_windows(subject)
        for bucket in (state.requests, state.tokens):
            if bucket is not None:
                bucket.refill(now)
        return state

    @staticmethod
    def _reconfigure(old: _State | None, limits: Limits, now: float) -> _State:
        """A state for new limits; what was used keeps counting (no free refill on a change)."""

        def bucket(limit: int | None, previous: _Bucket | None) -> _Bucket | None:
            if limit is None:
                return None
            if previous is None:
                return _Bucket(float(limit), float(limit), now)
            used = previous.capacity - previous.level
            return _Bucket(float(limit), float(limit) - used, previous.updated)

        in_flight = old.in_flight if old is not None else 0
        requests = bucket(limits.rpm, old.requests if old else None)
        tokens = bucket(limits.tpm, old.tokens if old else None)
        return _State(requests, tokens, in_flight, limits)

    # ------------------------------------------------------------ quota windows

    def unseeded(self, subjects: Sequence[Subject]) -> list[tuple[Subject, Window]]:
        """The current windows of the subjects' quotas that this limiter has no counters for
        yet (:meth:`ensure_seeded` loads them)."""
        if not _has_quotas(subjects):
            return []
        now = self._wall_clock()
        missing = []
        for subject in subjects:
            for period in subject.limits.periods:
                window = window_of(period, now)
                held = self._windows.get((subject.kind, subject.name, period))
                if held is None or held[0] != window.id:
                    missing.append((subject, window))
        return missing

    async def ensure_seeded(self, subjects: Sequence[Subject]) -> None:
        """Load the windows :meth:`unseeded` names from the quota source (each once, however
        many requests wait for it)."""
        for subject, window in self.unseeded(subjects):
            key = (subject.kind, subject.name, window.period)
            slot = (key, window.id)
            loading = self._loading.get(slot)
            if loading is None:
                loading = asyncio.ensure_future(self._source.consumed(key[0], key[1], window))
                self._loading[slot] = loading
                loading.add_done_callback(partial(forget_pending, self._loading, slot))
            consumed = await asyncio.shield(loading)
            held = self._windows.get(key)
            if held is None or held[0] != window.id:
                self._windows[key] = (window.id, consumed)

    def _windows_of(self, subject: Subject, now: datetime) -> dict[QuotaPeriod, Consumed]:
        windows = {}
        for period in subject.limits.periods:
            window = window_of(period, now)
            held = self._windows.get((subject.kind, subject.name, period))
            if held is None or held[0] != window.id:
                raise RuntimeError(f"quota window {window.id} of {subject.label} is not loaded")
            windows[period] = held[1]
        return windows

    # ------------------------------------------------------------ admission

    def admit(
        self, subjects: Sequence[Subject], tokens: int, charge: Charge = NO_CHARGE
    ) -> Admission:
        """Admit one request that may use ``tokens`` (and ``charge``), against every subject's
        limits and quotas. A subject with quotas needs its windows loaded first
        (:meth:`ensure_seeded`; :meth:`admit_async` does both).

        Raises:
            RateLimitError: a limit is reached (nothing is taken); ``retry_after_s`` is how long
                until the request would pass, or a minute for a request larger than a tpm limit.
            QuotaExceededError: a quota is used up; ``retry_after_s`` runs to the period's end.
        """
        now = self._clock()
        states = [self._state(s, now) for s in subjects]
        for subject, state in zip(subjects, states, strict=True):
            _check(subject, state, tokens)
        taken: list[Consumed] = []
        if self._windows or _has_quotas(subjects):
            taken = self._check_quotas(subjects, tokens, charge)
        for state in states:
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= tokens
            state.in_flight += 1
        for window in taken:
            window.add(tokens, charge)
        return Admission(self, states, tokens, taken, charge)

    def _check_quotas(
        self, subjects: Sequence[Subject], tokens: int, charge: Charge
    ) -> list[Consumed]:
        """Raise past a quota; else the windows this admission takes from."""
        wall = self._wall_clock()
        taken: list[Consumed] = []
        for subject in subjects:
            held = self._windows_of(subject, wall)
            for quota in subject.limits.quotas:
                used = held[quota.period].get(quota.metric)
                cost = cost_of(quota.metric, tokens, charge)
                if over_quota(used, cost, quota.limit):
                    raise quota_error(subject.label, quota, used, cost, wall)
            taken += held.values()
        return taken

    def _forget_unused_windows(self, subject: Subject) -> None:
        """Drop the windows of periods a subject no longer has quotas for (when its limits
        change): if one comes back, its window is loaded again from the usage table (not
        counted on from stale counters)."""
        for period in QuotaPeriod:
            key = (subject.kind, subject.name, period)
            if key in self._windows and period not in subject.limits.periods:
                del self._windows[key]

    async def admit_async(
        self, subjects: Sequence[Subject], tokens: int, charge: Charge = NO_CHARGE
    ) -> Admission:
        """:meth:`admit`, after loading the quota windows it needs (no ``await`` between the
        checks and the taking)."""
        while self.unseeded(subjects):  # a loop: a new day may begin while one loads
            await self.ensure_seeded(subjects)
        return self.admit(subjects, tokens, charge)

    def settle(self, states: list[_State], refund_tokens: int) -> None:
        """Free the concurrency slots; give back (or take, if negative) tokens."""
        now = self._clock()
        for state in states:
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None:
                state.tokens.refill(now)
                state.tokens.level = min(state.tokens.capacity, state.tokens.level + refund_tokens)


def _has_quotas(subjects: Sequence[Subject]) -> bool:
    # A plain loop: on the admission path it is cheaper than any() over a generator.
    for subject in subjects:  # noqa: SIM110
        if subject.limits.quotas:
            return True
    return False


def _check(subject: Subject, state: _State, tokens: int) -> None:
    limits = subject.limits
    if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
        raise rate_limit_error(subject, "concurrency", 1, state.in_flight, tokens)
    if state.requests is not None and limits.rpm is not None:
        wait = state.requests.wait_s(1)
        if wait > 0:
            raise rate_limit_error(subject, "rpm", math.ceil(wait), 0, tokens)
    if state.tokens is not None and limits.tpm is not None:
        if tokens > limits.tpm:
            raise rate_limit_error(subject, "too_large", int(_SECONDS_PER_MINUTE), 0, tokens)
        wait = state.tokens.wait_s(tokens)
        if wait > 0:
            raise rate_limit_error(subject, "tpm", math.ceil(wait), 0, tokens)


def rate_limit_error(
    subject: Subject, reason: str, retry_after_s: int, in_flight: int, tokens: int
) -> RateLimitError:
    """The 429 for ``subject`` past one of its limits; every limiter words it the same way.

    Args:
        reason: ``concurrency``, ``rpm``, ``too_large`` (one request above the tpm limit) or
            ``tpm``.
    """
    limits = subject.limits
    if reason == "concurrency":
        return RateLimitError(
            f"{subject.label} has {in_flight} requests in flight, its limit of "
            f"concurrent requests ({limits.max_concurrent}); retry when one finishes",
            retry_after_s=max(1, retry_after_s),
        )
    if reason == "rpm":
        return RateLimitError(
            f"{subject.label} reached its limit of {limits.rpm} requests per minute",
            retry_after_s=max(1, retry_after_s),
        )
    if reason == "too_large":
        return RateLimitError(
            f"this request may use {tokens} tokens (prompt + max_tokens), more than the "
            f"limit of {limits.tpm} tokens per minute of {subject.label}; lower max_tokens",
            param="max_tokens",
            retry_after_s=_SECONDS_PER_MINUTE,
        )
    return RateLimitError(
        f"{subject.label} reached its limit of {limits.tpm} tokens per minute "
        f"(this request reserves {tokens})",
        retry_after_s=max(1, retry_after_s),
    )
