"""Quotas per period: how much a key or a tenant may use in a UTC calendar day or month.

A quota caps one **metric** (``tokens``, ``requests``, ``audio_seconds``, ``images``) over one
**period** (``day``: from 00:00 UTC; ``month``: from the 1st, 00:00 UTC); a key or tenant may
have several (``1000000 tokens/month`` and ``50000 tokens/day``). The limiters
(:mod:`lmaas.gateway.limits`, :mod:`lmaas.gateway.redis_limits`) check them at admission, with
the rate limits and in the same all-or-nothing step, against a **window**: the counters of one
subject for one period instance (``day 2026-11-27``, ``month 2026-11``).

What an admission charges a window: one request; the tokens reserved (the prompt estimate plus
``max_tokens``, as for ``tpm``), settled to the worker's count at the end; the images a
classification carries; the seconds of audio a transcription carries (read from a WAV header,
else 0), settled to the worker's measured duration. A window past its limit refuses with
:class:`~lmaas.core.errors.QuotaExceededError` (429, ``quota_exceeded``) and ``Retry-After``:
the seconds until the window ends.

Where the consumed amounts come from: the **usage table** is the durable truth (one record per
request that reached the engine, what is billed). The first time a limiter meets a window it
has no counters for (a gateway start, a new day, a quota just added, a Redis that lost its
data), it loads that subject's usage in the window from the DB (:class:`QuotaSource`) and counts
on from there; so quotas survive a gateway restart.
"""

from __future__ import annotations

import enum
import functools
import io
import re
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from lmaas.core.errors import InvalidRequestError, QuotaExceededError


class QuotaMetric(enum.StrEnum):
    """What a quota counts."""

    TOKENS = "tokens"
    """Prompt + generated + embedded tokens (as the usage records count them)."""
    REQUESTS = "requests"
    """Model calls admitted."""
    AUDIO_SECONDS = "audio_seconds"
    """Seconds of audio transcribed."""
    IMAGES = "images"
    """Images classified."""


class QuotaPeriod(enum.StrEnum):
    """The UTC calendar period a quota resets on."""

    DAY = "day"
    MONTH = "month"


METRICS: tuple[QuotaMetric, ...] = tuple(QuotaMetric)
MAX_QUOTA = float(1 << 50)
_QUOTA_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([a-z]+)\s*$")
_UNITS = {
    QuotaMetric.TOKENS: "tokens",
    QuotaMetric.REQUESTS: "requests",
    QuotaMetric.AUDIO_SECONDS: "audio s",
    QuotaMetric.IMAGES: "images",
}


def amount_text(value: float) -> str:
    """``1000000`` rather than ``1e+06``; fractions (audio seconds) to 3 decimals at most."""
    return str(int(value)) if value == int(value) else f"{value:.3f}".rstrip("0")


@dataclass(slots=True, frozen=True)
class Quota:
    """At most ``limit`` of ``metric`` per ``period``."""

    metric: QuotaMetric
    limit: float
    period: QuotaPeriod

    @property
    def text(self) -> str:
        """``1000000 tokens/month``."""
        return f"{amount_text(self.limit)} {_UNITS[self.metric]}/{self.period.value}"

    def as_dict(self) -> dict[str, object]:
        return {"metric": self.metric.value, "limit": self.limit, "period": self.period.value}


def make_quota(metric: str, limit: float, period: str) -> Quota:
    """A checked quota from its parts (API bodies, DB rows).

    Raises:
        InvalidRequestError: an unknown metric or period, a limit not above 0, a fractional
            limit for a count.
    """
    try:
        quota_metric = QuotaMetric(metric)
    except ValueError:
        known = ", ".join(m.value for m in QuotaMetric)
        raise InvalidRequestError(
            f"unknown quota metric {metric[:40]!r} (known: {known})", param="quotas"
        ) from None
    try:
        quota_period = QuotaPeriod(period)
    except ValueError:
        raise InvalidRequestError(
            f"unknown quota period {period[:40]!r} (use day or month)", param="quotas"
        ) from None
    if not 0 < limit <= MAX_QUOTA or limit != limit:
        raise InvalidRequestError(
            f"a {metric} quota must be above 0 and at most 2^50, not {limit}", param="quotas"
        )
    if quota_metric is not QuotaMetric.AUDIO_SECONDS and limit != int(limit):
        raise InvalidRequestError(
            f"a {metric} quota is a whole number, not {limit}", param="quotas"
        )
    return Quota(quota_metric, float(limit), quota_period)


def parse_quota(metric: str, value: str) -> Quota | None:
    """``"1000000/month"`` for ``metric`` as a quota; ``"0"`` is None (no quota).

    Raises:
        InvalidRequestError: another shape.
    """
    if value.strip() == "0":
        return None
    match = _QUOTA_RE.fullmatch(value)
    if match is None:
        raise InvalidRequestError(
            f"invalid {metric} quota {value[:40]!r}: use AMOUNT/day or AMOUNT/month "
            "(e.g. 1000000/month), or 0 to remove it",
            param="quotas",
        )
    return make_quota(metric, float(match.group(1)), match.group(2))


def check_quotas(quotas: Iterable[Quota]) -> tuple[Quota, ...]:
    """Quotas in a stable order (metric, period); one per metric and period.

    Raises:
        InvalidRequestError: two quotas for the same metric and period.
    """
    by_slot: dict[tuple[str, str], Quota] = {}
    for quota in quotas:
        slot = (quota.metric.value, quota.period.value)
        if slot in by_slot:
            raise InvalidRequestError(
                f"two {quota.metric.value} quotas per {quota.period.value}", param="quotas"
            )
        by_slot[slot] = quota
    return tuple(by_slot[s] for s in sorted(by_slot))


def quotas_text(quotas: Iterable[Quota]) -> str:
    return ", ".join(q.text for q in quotas)


# --------------------------------------------------------------------------- windows


@dataclass(slots=True, frozen=True)
class Window:
    """One instance of a period: ``day 2026-11-27`` from its start (inclusive) to its end."""

    period: QuotaPeriod
    id: str
    start: datetime
    end: datetime


def window_of(period: QuotaPeriod, now: datetime) -> Window:
    """The UTC calendar day or month that holds ``now``."""
    if now.tzinfo is not UTC:
        now = now.astimezone(UTC)
    if period is QuotaPeriod.DAY:
        return _window(period, now.year, now.month, now.day)
    return _window(period, now.year, now.month, 1)


@functools.lru_cache(maxsize=256)
def _window(period: QuotaPeriod, year: int, month: int, day: int) -> Window:
    start = datetime(year, month, day, tzinfo=UTC)
    if period is QuotaPeriod.DAY:
        return Window(period, start.strftime("%Y-%m-%d"), start, start + timedelta(days=1))
    end = (
        datetime(year + 1, 1, 1, tzinfo=UTC)
        if month == 12
        else datetime(year, month + 1, 1, tzinfo=UTC)
    )
    return Window(period, start.strftime("%Y-%m"), start, end)


# --------------------------------------------------------------------------- what is charged


@dataclass(slots=True, frozen=True)
class Charge:
    """What one admission takes from its windows, besides one request and its tokens."""

    audio_seconds: float = 0.0
    images: int = 0


NO_CHARGE = Charge()


@dataclass(slots=True)
class Consumed:
    """A window's counters (what was used, plus what admitted requests still hold)."""

    tokens: float = 0.0
    requests: float = 0.0
    audio_seconds: float = 0.0
    images: float = 0.0

    def get(self, metric: QuotaMetric) -> float:
        return float(getattr(self, metric.value))

    def add(self, tokens: float, charge: Charge, requests: float = 1.0) -> None:
        self.tokens += tokens
        self.requests += requests
        self.audio_seconds += charge.audio_seconds
        self.images += charge.images


def cost_of(metric: QuotaMetric, tokens: int, charge: Charge) -> float:
    """What one admission adds to ``metric``."""
    if metric is QuotaMetric.TOKENS:
        return float(tokens)
    if metric is QuotaMetric.REQUESTS:
        return 1.0
    if metric is QuotaMetric.AUDIO_SECONDS:
        return charge.audio_seconds
    return float(charge.images)


def over_quota(used: float, cost: float, limit: float) -> bool:
    """A window refuses when it is used up, or when this admission would pass its limit."""
    return used >= limit or used + cost > limit


def quota_error(
    label: str, quota: Quota, used: float, cost: float, now: datetime
) -> QuotaExceededError:
    """The 429 of a window past its quota; ``Retry-After`` is the time until the window ends."""
    window = window_of(quota.period, now)
    wait = max(1.0, (window.end - now.astimezone(UTC)).total_seconds())
    unit = _UNITS[quota.metric]
    if cost > quota.limit:
        message = (
            f"this request needs {amount_text(cost)} {unit}, more than the quota of "
            f"{quota.text} of {label}"
            + ("; lower max_tokens" if quota.metric is QuotaMetric.TOKENS else "")
        )
        param = "max_tokens" if quota.metric is QuotaMetric.TOKENS else None
        return QuotaExceededError(message, param=param, retry_after_s=wait)
    return QuotaExceededError(
        f"{label} used {amount_text(used)} of its quota of {quota.text} (this "
        f"{quota.period.value} ends {window.end.strftime('%Y-%m-%dT%H:%MZ')}; this request "
        f"needs {amount_text(cost)})",
        retry_after_s=wait,
    )


def estimate_audio_seconds(audio: bytes) -> float:
    """Seconds of a WAV file from its header (no decoding); 0 for other formats, whose length
    the worker measures (the admission is settled to it)."""
    if audio[:4] != b"RIFF" or audio[8:12] != b"WAVE":
        return 0.0
    try:
        with wave.open(io.BytesIO(audio), "rb") as reader:
            rate = reader.getframerate()
            return reader.getnframes() / rate if rate > 0 else 0.0
    except (wave.Error, EOFError, ValueError):
        return 0.0


# --------------------------------------------------------------------------- durable state


class QuotaSource(Protocol):
    """Where a window's consumed amounts are loaded from (the usage table)."""

    async def consumed(self, kind: str, name: str, window: Window) -> Consumed:
        """What ``kind`` (``key``/``tenant``) ``name`` (``lmaas-<id>`` for a key) used in
        ``window``, as the durable usage records say."""
        ...


class ZeroSource:
    """No durable state: every window starts empty (tests, a gateway without metering)."""

    async def consumed(self, kind: str, name: str, window: Window) -> Consumed:
        return Consumed()
