"""The Redis limiter's scripts against the real Redis (127.0.0.1:6379; skipped without it).

Each test works under its own key prefix and deletes its keys afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from lmaas.core.errors import QuotaExceededError, RateLimitError, ServiceUnavailableError
from lmaas.core.messages import ChatMessage, GenerateRequest, SamplingParams
from lmaas.gateway.keys import Principal, Scope
from lmaas.gateway.limited import LimitedEngineClient
from lmaas.gateway.limits import Limits, Subject
from lmaas.gateway.quotas import (
    Charge,
    Consumed,
    QuotaPeriod,
    Window,
    make_quota,
    parse_quota,
    window_of,
)
from lmaas.gateway.redis_limits import RedisLimiter
from lmaas.gateway.resp import RespClient
from lmaas.testing.fakes import FakeEngineClient
from tests.unit.gateway.gov_helpers import FakeClock
from tests.unit.gateway.redis_helpers import REDIS_URL, MakeLimiter, limiters, redis_probe

pytestmark = pytest.mark.anyio


@pytest.fixture
async def make_limiter() -> AsyncIterator[MakeLimiter]:
    """Limiters (each its own client, like separate gateways) under one fresh prefix."""
    async with redis_probe() as probe:
        new_client = lambda: RespClient.from_url(REDIS_URL, timeout_s=5.0)  # noqa: E731
        async with limiters(probe, new_client) as make:
            yield make


def _key(name: str = "lmaas-k", **limits: int) -> Subject:
    return Subject("key", name, Limits(**limits))


async def test_requests_per_minute_admits_exactly_the_bucket(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    subject = [_key(rpm=3)]
    for _ in range(3):
        (await limiter.admit_async(subject, 0)).finish(0)
    with pytest.raises(RateLimitError, match="limit of 3 requests per minute") as refused:
        await limiter.admit_async(subject, 0)
    # refills at 3/min: one request is back in 20 s
    assert 1 <= refused.value.retry_after_s <= 20


async def test_tokens_are_reserved_then_settled(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    subject = [_key(tpm=100)]
    admission = await limiter.admit_async(subject, 80)
    with pytest.raises(RateLimitError, match="reserves 30"):
        await limiter.admit_async(subject, 30)
    admission.finish(10)  # used 10 of the 80 reserved: 70 go back
    await limiter.wait_settled()
    (await limiter.admit_async(subject, 85)).finish(85)
    with pytest.raises(RateLimitError):
        await limiter.admit_async(subject, 10)
    with pytest.raises(RateLimitError, match="lower max_tokens") as too_large:
        await limiter.admit_async(subject, 101)
    assert too_large.value.param == "max_tokens"


async def test_settling_more_than_reserved_takes_the_rest(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    subject = [_key(tpm=100)]
    (await limiter.admit_async(subject, 10)).finish(100)  # used 90 more than reserved
    await limiter.wait_settled()
    with pytest.raises(RateLimitError):
        await limiter.admit_async(subject, 5)


async def test_concurrency_is_held_until_finish(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    subject = [_key(max_concurrent=2)]
    first = await limiter.admit_async(subject, 0)
    await limiter.admit_async(subject, 0)
    with pytest.raises(RateLimitError, match="2 requests in flight") as refused:
        await limiter.admit_async(subject, 0)
    assert refused.value.retry_after_s == 1
    first.finish(0)
    await limiter.wait_settled()
    await limiter.admit_async(subject, 0)


async def test_key_and_tenant_are_all_or_nothing(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    tenant = Subject("tenant", "team", Limits(rpm=2))
    one, two = _key("lmaas-a", rpm=1), _key("lmaas-b", rpm=5)
    await limiter.admit_async([one, tenant], 0)
    with pytest.raises(RateLimitError, match="key lmaas-a"):
        await limiter.admit_async([one, tenant], 0)
    await limiter.admit_async([two, tenant], 0)  # the refusal above took nothing from the tenant
    with pytest.raises(RateLimitError, match="tenant team"):
        await limiter.admit_async([two, tenant], 0)
    # ... and this refusal took nothing from key b: 4 of its 5 are left once the tenant allows
    other_tenant = Subject("tenant", "other", Limits())
    for _ in range(4):
        await limiter.admit_async([two, other_tenant], 0)
    with pytest.raises(RateLimitError, match="key lmaas-b"):
        await limiter.admit_async([two, other_tenant], 0)


async def test_a_changed_limit_keeps_what_was_used(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    for _ in range(3):
        await limiter.admit_async([_key(rpm=3)], 0)
    await limiter.admit_async([_key(rpm=4)], 0)  # one more room, not a fresh bucket of 4
    with pytest.raises(RateLimitError):
        await limiter.admit_async([_key(rpm=4)], 0)


async def test_gateways_racing_never_overspend(make_limiter: MakeLimiter) -> None:
    """Four limiters (separate connections, like four gateways) race 200 admissions."""
    limiters = [await make_limiter() for _ in range(4)]
    subjects = [_key(rpm=10), Subject("tenant", "team", Limits(tpm=1000, max_concurrent=7))]
    admitted: list[int] = []

    async def one(i: int) -> None:
        try:
            await limiters[i % 4].admit_async(subjects, 50)
        except RateLimitError:
            return
        admitted.append(i)

    await asyncio.gather(*(one(i) for i in range(200)))
    assert len(admitted) == 7  # the tenant's 7 concurrent slots bind first (none finished)


async def test_a_dead_gateways_slots_come_back(make_limiter: MakeLimiter) -> None:
    alive = await make_limiter(lease_ttl_s=0.6)
    dead = await make_limiter(lease_ttl_s=0.6)
    subject = [_key(max_concurrent=1)]
    held = await alive.admit_async(subject, 0)
    await asyncio.sleep(1.0)  # past the ttl, but the live gateway refreshed its lease
    with pytest.raises(RateLimitError):
        await dead.admit_async(subject, 0)
    held.finish(0)
    await alive.wait_settled()
    await dead.admit_async(subject, 0)
    dead._live.clear()  # the gateway "dies": nobody refreshes its lease any more
    await asyncio.sleep(0.1)
    with pytest.raises(RateLimitError):
        await alive.admit_async(subject, 0)
    await asyncio.sleep(0.7)
    await alive.admit_async(subject, 0)  # the dead gateway's slot expired


async def test_redis_unreachable_fails_closed() -> None:
    limiter = RedisLimiter.from_url("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(ServiceUnavailableError, match="Redis is unreachable"):
            await limiter.admit_async([_key(rpm=1)], 0)
    finally:
        await limiter.aclose()


async def test_limited_engine_streams_admit_lazily(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    principal = Principal("k1", "team", frozenset({Scope.INFERENCE}), ("*",), Limits(tpm=100))
    engine = LimitedEngineClient(FakeEngineClient(), principal, limiter)
    request = GenerateRequest(
        "r", SamplingParams(max_tokens=50), messages=[ChatMessage("user", "one two")]
    )
    used = 0
    async for delta in engine.generate("fake-chat", request):
        used += delta.prompt_tokens + delta.num_new_tokens
    await limiter.wait_settled()
    assert 0 < used < 50
    subject = [Subject("key", "lmaas-k1", Limits(tpm=100))]
    with pytest.raises(RateLimitError):
        await limiter.admit_async(subject, 100 - used + 1)
    await limiter.admit_async(subject, 100 - used)
    big = GenerateRequest("r", SamplingParams(max_tokens=500), prompt="x")
    stream = engine.generate("fake-chat", big)
    with pytest.raises(RateLimitError, match="lower max_tokens"):
        await anext(stream)


# ------------------------------------------------------------------ quotas per day or month


class Source:
    """A quota source answering fixed amounts, counting its loads."""

    def __init__(self, **used: float) -> None:
        self.used = Consumed(**used)
        self.loads = 0

    async def consumed(self, kind: str, name: str, window: Window) -> Consumed:
        self.loads += 1
        await asyncio.sleep(0.01)
        return Consumed(self.used.tokens, self.used.requests, self.used.audio_seconds)


def _quota_key(name: str = "lmaas-k", **quotas: str) -> Subject:
    parsed = [parse_quota(metric, value) for metric, value in quotas.items()]
    return Subject("key", name, Limits(quotas=tuple(q for q in parsed if q is not None)))


async def test_a_quota_window_is_seeded_once_then_counted_in_redis(
    make_limiter: MakeLimiter,
) -> None:
    wall = FakeClock()
    wall.now = datetime(2026, 4, 30, 23, 0, tzinfo=UTC)
    source = Source(requests=7)
    limiters = [await make_limiter(quota_source=source, wall_clock=wall) for _ in range(3)]
    subject = [_quota_key(requests="10/day")]
    results = await asyncio.gather(
        *(limiters[i % 3].admit_async(subject, 0) for i in range(12)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3  # 7 used before
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, QuotaExceededError) for r in refusals)
    assert refusals[0].retry_after_s == 3600  # type: ignore[attr-defined]
    assert 1 <= source.loads <= 3  # at most once per gateway; the first seed wins
    key = limiters[0].window_key(subject[0], window_of(QuotaPeriod.DAY, wall.now))
    assert key.endswith(":key:lmaas-k:quota:day:2026-04-30")
    ttl_ms = await limiters[0]._client.execute("PTTL", key)
    assert 3600_000 < ttl_ms <= 3600_000 + 86_400_000  # the window's end, plus a day
    wall.advance(hours=1)  # May 1st: a new day window, seeded again
    source.used = Consumed()
    await limiters[1].admit_async(subject, 0)


async def test_quota_tokens_are_reserved_and_settled_in_redis(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    subject = [_quota_key(tokens="100/month")]
    first = await limiter.admit_async(subject, 60)
    with pytest.raises(QuotaExceededError, match="100 tokens/month"):
        await limiter.admit_async(subject, 50)
    first.finish(10)
    await limiter.wait_settled()
    (await limiter.admit_async(subject, 50)).finish(85)
    await limiter.wait_settled()
    with pytest.raises(QuotaExceededError, match="used 95 of"):
        await limiter.admit_async(subject, 6)
    audio = [_quota_key("lmaas-a", audio_seconds="30/day")]
    (await limiter.admit_async(audio, 0, Charge(audio_seconds=4.0))).finish(0, 28.0)
    await limiter.wait_settled()
    with pytest.raises(QuotaExceededError, match="used 28 of"):
        await limiter.admit_async(audio, 0, Charge(audio_seconds=2.5))
    images = [_quota_key("lmaas-i", images="3/day")]
    await limiter.admit_async(images, 0, Charge(images=3))
    with pytest.raises(QuotaExceededError):
        await limiter.admit_async(images, 0, Charge(images=1))


async def test_gateways_racing_never_overspend_a_quota(make_limiter: MakeLimiter) -> None:
    limiters = [await make_limiter() for _ in range(4)]
    subjects = [
        _quota_key(requests="1000/day"),
        Subject("tenant", "team", Limits(quotas=(make_quota("tokens", 1000, "month"),))),
    ]
    admitted: list[int] = []

    async def one(i: int) -> None:
        try:
            await limiters[i % 4].admit_async(subjects, 30)
        except QuotaExceededError:
            return
        admitted.append(i)

    await asyncio.gather(*(one(i) for i in range(200)))
    assert len(admitted) == 33  # 33 x 30 <= 1000 tokens; a refusal took nothing
