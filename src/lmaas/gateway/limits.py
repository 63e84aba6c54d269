"""Per-key and per-tenant rate limits, in process: requests/min, tokens/min, concurrency.

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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lmaas.core.errors import InvalidRequestError, RateLimitError

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

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

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
        return self


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

    __slots__ = ("_done", "_limiter", "_states", "reserved_tokens")

    def __init__(self, limiter: InProcessLimiter, states: list[_State], tokens: int) -> None:
        self._limiter = limiter
        self._states = states
        self._done = False
        self.reserved_tokens = tokens

    def finish(self, used_tokens: int) -> None:
        """Release the concurrency slots and settle the reservation to ``used_tokens``."""
        if self._done:
            return
        self._done = True
        self._limiter.settle(self._states, self.reserved_tokens - used_tokens)


class Hold(Protocol):
    """An admitted request's hold on its limits (what every limiter's admission offers)."""

    reserved_tokens: int

    def finish(self, used_tokens: int) -> None:
        """Release the concurrency slots and settle the reservation (once; never awaits)."""


class SharedLimiter(Protocol):
    """A limiter whose state lives outside the process (Redis): admission awaits I/O."""

    async def admit_async(self, subjects: Sequence[Subject], tokens: int) -> Hold:
        """Raises: RateLimitError past a limit (nothing taken)."""

    async def aclose(self) -> None: ...


class InProcessLimiter:
    """Token buckets and in-flight counters per subject, for one gateway process.

    Args:
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[tuple[str, str], _State] = {}

    def _state(self, subject: Subject, now: float) -> _State:
        key = (subject.kind, subject.name)
        state = self._states.get(key)
        if state is None or state.limits != subject.limits:
            state = self._reconfigure(state, subject.limits, now)
            self._states[key] = state
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

    def admit(self, subjects: list[Subject], tokens: int) -> Admission:
        """Admit one request that may use ``tokens``, against every subject's limits.

        Raises:
            RateLimitError: a limit is reached (nothing is taken); ``retry_after_s`` is how long
                until the request would pass, or a minute for a request larger than a tpm limit.
        """
        now = self._clock()
        states = [self._state(s, now) for s in subjects]
        for subject, state in zip(subjects, states, strict=True):
            _check(subject, state, tokens)
        for state in states:
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= tokens
            state.in_flight += 1
        return Admission(self, states, tokens)

    def settle(self, states: list[_State], refund_tokens: int) -> None:
        """Free the concurrency slots; give back (or take, if negative) tokens."""
        now = self._clock()
        for state in states:
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None:
                state.tokens.refill(now)
                state.tokens.level = min(state.tokens.capacity, state.tokens.level + refund_tokens)


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
