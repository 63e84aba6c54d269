"""The Redis limiter's local credit against the real Redis (127.0.0.1:6379; skipped without it):
admissions with no round trip, gateways hammering together never passing a limit, credit going
back, a crashed gateway's credit ending, refusals when it runs out, Redis going away.

Each test works under its own key prefix and deletes its keys afterwards."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from lmaas.core.errors import QuotaExceededError, RateLimitError, ServiceUnavailableError
from lmaas.gateway.limits import Limits, Subject
from lmaas.gateway.quotas import QuotaPeriod, make_quota, window_of
from lmaas.gateway.redis_limits import RedisAdmission, RedisLimiter
from lmaas.gateway.redis_scripts import ADMIT_LUA, CREDIT_LUA, SETTLE_LUA
from lmaas.gateway.resp import Arg, RedisAddress, RespClient, Script
from tests.unit.gateway.redis_helpers import REDIS_URL, MakeLimiter, limiters, redis_probe

pytestmark = pytest.mark.anyio

ADMIT_SHA = Script(ADMIT_LUA).sha
CREDIT_SHA = Script(CREDIT_LUA).sha
SETTLE_SHA = f"nowait {Script(SETTLE_LUA).sha}"


class CountingClient(RespClient):
    """A client that counts the scripts it runs, by SHA-1."""

    def __init__(self, address: RedisAddress) -> None:
        super().__init__(address, timeout_s=5.0)
        self.runs: Counter[str] = Counter()

    async def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        self.runs[script.sha] += 1
        return await super().run_script(script, keys, args)

    def run_script_nowait(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> asyncio.Future[Any]:
        self.runs[f"nowait {script.sha}"] += 1
        return super().run_script_nowait(script, keys, args)


@pytest.fixture
async def probe() -> AsyncIterator[aioredis.Redis]:
    async with redis_probe() as client:
        yield client


@pytest.fixture
async def make_limiter(probe: aioredis.Redis) -> AsyncIterator[MakeLimiter]:
    """Limiters with credit (each its own counting client, like separate gateways) under one
    fresh prefix."""
    async with limiters(probe, lambda: CountingClient(RedisAddress.parse(REDIS_URL))) as make:
        yield make


def _runs(limiter: RedisLimiter, sha: str) -> int:
    client = limiter._client
    assert isinstance(client, CountingClient)
    return client.runs[sha]


async def _hammer(
    limiters: Sequence[RedisLimiter],
    subjects: list[Subject],
    total: int,
    *,
    tokens: int = 0,
    wave: int = 16,
    finish: bool = True,
    used: int | None = None,
) -> tuple[list[RedisAdmission], list[Exception]]:
    """``total`` admissions in waves of ``wave`` at once, spread over the limiters; each
    finished after its wave, having used ``used`` tokens (default: what it reserved)."""
    admitted: list[RedisAdmission] = []
    refused: list[Exception] = []
    for start in range(0, total, wave):
        calls = [
            limiters[i % len(limiters)].admit_async(subjects, tokens)
            for i in range(start, min(total, start + wave))
        ]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, RedisAdmission):
                admitted.append(result)
                if finish:
                    result.finish(tokens if used is None else used)
            else:
                assert isinstance(result, RateLimitError | QuotaExceededError), result
                refused.append(result)
        await asyncio.sleep(0.002)  # the refills' replies come in
    return admitted, refused


async def _level(probe: aioredis.Redis, key: str) -> float:
    """A bucket's level now, refilled as the scripts refill it (without the credit cap)."""
    fields = await probe.hgetall(key)
    seconds, micros = await probe.time()
    now_ms = seconds * 1000 + micros // 1000
    cap = float(fields["cap"])
    return min(cap, float(fields["level"]) + (now_ms - int(fields["ts"])) * cap / 60000)


def _credit_fields(fields: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k.startswith(("h:", "x:"))}


async def test_a_busy_key_is_admitted_from_credit_without_round_trips(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    limiter = await make_limiter()
    quotas = (make_quota("tokens", 10**9, "month"), make_quota("requests", 10**6, "day"))
    subjects = [
        Subject("key", "lmaas-k", Limits(rpm=60_000, tpm=10**7, max_concurrent=1000)),
        Subject("tenant", "team", Limits(rpm=10**6, quotas=quotas)),
    ]
    admitted, refused = await _hammer([limiter], subjects, 400, tokens=20, wave=4)
    assert len(admitted) == 400 and not refused
    admits = _runs(limiter, ADMIT_SHA)
    assert admits < 40, admits  # the first few, until the rate says credit is worth it
    assert _runs(limiter, CREDIT_SHA) < 80
    await limiter.aclose()  # gives the credit back: the windows count exactly what was admitted
    day = window_of(QuotaPeriod.DAY, datetime.now(UTC))
    window = await probe.hgetall(limiter.window_key(subjects[1], day))
    assert float(window["requests"]) == 400
    assert float(window["tokens"]) == 400 * 20
    assert not _credit_fields(window)


async def test_without_credit_every_admission_runs_the_script(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(credit=False)
    subjects = [Subject("key", "lmaas-k", Limits(rpm=60_000))]
    await _hammer([limiter], subjects, 100, wave=4)
    assert _runs(limiter, ADMIT_SHA) == 100
    assert _runs(limiter, CREDIT_SHA) == 0


async def test_two_gateways_never_pass_a_shared_rpm_together(make_limiter: MakeLimiter) -> None:
    limiters = [await make_limiter(), await make_limiter()]
    subjects = [Subject("key", "lmaas-k", Limits(rpm=640))]  # credit: at most 40 a gateway
    started = asyncio.get_running_loop().time()
    admitted, refused = await _hammer(limiters, subjects, 500)
    assert not refused
    assert sum(_runs(limiter, ADMIT_SHA) for limiter in limiters) < 100  # the rest: credit
    more, refused = await _hammer(limiters, subjects, 700)
    elapsed = asyncio.get_running_loop().time() - started
    refill = math.ceil(elapsed * 640 / 60)
    total = len(admitted) + len(more)
    assert 640 - 2 * 40 <= total <= 640 + refill, (total, elapsed)
    assert all(isinstance(r, RateLimitError) and r.retry_after_s >= 1 for r in refused)


async def test_two_gateways_never_pass_a_shared_tpm_together(make_limiter: MakeLimiter) -> None:
    limiters = [await make_limiter(), await make_limiter()]
    subjects = [Subject("tenant", "team", Limits(tpm=64_000))]  # at most 4,000 a gateway
    started = asyncio.get_running_loop().time()
    admitted, _ = await _hammer(limiters, subjects, 800, tokens=100)
    elapsed = asyncio.get_running_loop().time() - started
    refill = math.ceil(elapsed * 64_000 / 60 / 100)
    assert 640 - 2 * 40 <= len(admitted) <= 640 + refill, (len(admitted), elapsed)


async def test_two_gateways_never_pass_a_shared_concurrency_together(
    make_limiter: MakeLimiter,
) -> None:
    limiters = [await make_limiter(), await make_limiter()]
    subjects = [Subject("key", "lmaas-k", Limits(max_concurrent=128))]  # 8 slots a gateway
    # warm up: finished requests make both gateways hold slots as credit
    await _hammer(limiters, subjects, 200)
    running, refused = await _hammer(limiters, subjects, 400, finish=False)
    assert 128 - 2 * 8 <= len(running) <= 128
    assert all("in flight" in str(r) for r in refused)
    for admission in running[:10]:
        admission.finish(0)
    for limiter in limiters:
        await limiter.wait_settled()
    again, _ = await _hammer(limiters, subjects, 40, finish=False)
    assert len(again) <= 10 + 128 - len(running)


async def test_two_gateways_never_pass_a_shared_quota_together(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    limiters = [await make_limiter(), await make_limiter()]
    quota = make_quota("requests", 3200, "day")  # credit: at most 50 a gateway
    subjects = [Subject("key", "lmaas-k", Limits(quotas=(quota,)))]
    admitted, refused = await _hammer(limiters, subjects, 3600, wave=32)
    assert 3200 - 2 * 50 <= len(admitted) <= 3200
    assert all(isinstance(r, QuotaExceededError) for r in refused)
    for limiter in limiters:
        await limiter.aclose()
    day = window_of(QuotaPeriod.DAY, datetime.now(UTC))
    window = await probe.hgetall(limiters[0].window_key(subjects[0], day))
    assert float(window["requests"]) == len(admitted)


async def test_unused_credit_goes_back_after_idle_and_on_close(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    limiter = await make_limiter()
    subject = Subject("key", "lmaas-k", Limits(rpm=1600))  # credit: at most 100
    rpm_key = f"{limiter.prefix}:key:lmaas-k:rpm"
    await _hammer([limiter], [subject], 300)
    await asyncio.sleep(0.05)  # the last refill's reply
    before = await probe.hgetall(rpm_key)
    held = float(before[f"h:{limiter._lease_prefix[:-1]}"])  # as of the last claim
    assert await _level(probe, rpm_key) + held <= 1600
    assert limiter._credit is not None
    unused = limiter._credit._accounts[(rpm_key, "")].credit  # less what it admitted since
    assert 0 < unused <= held
    await asyncio.sleep(1.6)  # idle: the credit goes back
    after = await probe.hgetall(rpm_key)
    assert not _credit_fields(after)
    # the give-back refilled the level up to the cap less the credit, then added what was unused
    refill = (int(after["ts"]) - int(before["ts"])) * 1600 / 60000
    expected = min(1600 - held, float(before["level"]) + refill) + unused
    assert float(after["level"]) == pytest.approx(expected)
    await _hammer([limiter], [subject], 100)
    assert _credit_fields(await probe.hgetall(rpm_key))
    await limiter.aclose()
    assert not _credit_fields(await probe.hgetall(rpm_key))


@pytest.mark.parametrize("used", [40, 130])
async def test_settled_tokens_go_back_to_the_credit_or_come_from_it(
    make_limiter: MakeLimiter, probe: aioredis.Redis, used: int
) -> None:
    limiter = await make_limiter()
    quota = make_quota("tokens", 10**9, "month")
    subject = Subject("key", "lmaas-k", Limits(tpm=10**7, quotas=(quota,)))
    # 100 reserved: 60 back, or 30 more
    admitted, _ = await _hammer([limiter], [subject], 300, tokens=100, wave=4, used=used)
    assert len(admitted) == 300
    # refunds ride with the credit scripts; extra tokens come from the credit when it has them
    assert _runs(limiter, SETTLE_SHA) <= (30 if used < 100 else 150)  # 30: those before credit
    await limiter.wait_settled()
    await limiter.aclose()
    month = window_of(QuotaPeriod.MONTH, datetime.now(UTC))
    window = await probe.hgetall(limiter.window_key(subject, month))
    assert float(window["tokens"]) == 300 * used


async def test_credit_slots_live_while_their_gateway_does(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    limiter = await make_limiter(lease_ttl_s=0.6)
    subjects = [Subject("key", "lmaas-k", Limits(max_concurrent=64))]
    running, _ = await _hammer([limiter], subjects, 200, wave=4, finish=False)
    for admission in running[:-4]:
        admission.finish(0)
    await asyncio.sleep(0.05)
    leases = f"{limiter.prefix}:key:lmaas-k:leases"
    held = await probe.zcard(leases)
    assert held > 4  # the 4 running, and the slots held as credit
    await asyncio.sleep(0.7)  # past the lease ttl: the refresher kept them
    assert await probe.zcard(leases) == held
    await asyncio.sleep(0.6)  # idle: the free ones went back
    assert await probe.zcard(leases) == 4
    other = await make_limiter(credit=False)
    more, _ = await _hammer([other], subjects, 64, finish=False)
    assert len(more) == 60


async def test_bucket_credit_in_use_is_renewed(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(lease_ttl_s=1.0)  # bucket credit: 1 s, trusted 0.8 s
    subjects = [Subject("key", "lmaas-k", Limits(rpm=60_000))]
    await _hammer([limiter], subjects, 400, wave=8)  # a fast rate: large chunks
    await asyncio.sleep(0.05)
    admits = _runs(limiter, ADMIT_SHA)
    for _ in range(10):  # slow use for 1.5 s: the chunk lasts, its time is renewed
        await asyncio.sleep(0.15)
        (await limiter.admit_async(subjects, 0)).finish(0)
    assert _runs(limiter, ADMIT_SHA) == admits


async def test_a_changed_limit_gives_its_credit_back(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    limiter = await make_limiter()
    old = Limits(rpm=1600, quotas=(make_quota("requests", 6400, "day"),))
    new = Limits(rpm=3200, quotas=(make_quota("requests", 12800, "day"),))
    await _hammer([limiter], [Subject("key", "lmaas-k", old)], 200)
    subject = Subject("key", "lmaas-k", new)
    await _hammer([limiter], [subject], 200)
    await asyncio.sleep(0.05)  # the old credit's give-back, the last refill
    key = limiter.window_key(subject, window_of(QuotaPeriod.DAY, datetime.now(UTC)))
    assert limiter._credit is not None
    unused = limiter._credit._accounts[(key, "requests")].credit
    # counted: the admissions, and the credit of the new limit only
    assert float((await probe.hgetall(key))["requests"]) == 400 + unused
    await limiter.aclose()
    assert float((await probe.hgetall(key))["requests"]) == 400


async def test_a_crashed_gateways_credit_ends_by_itself(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    crashed = await make_limiter(lease_ttl_s=0.6)
    other = await make_limiter(lease_ttl_s=0.6, credit=False)
    subjects = [Subject("key", "lmaas-k", Limits(rpm=1600, max_concurrent=64))]
    await _hammer([crashed], subjects, 200)
    leases = f"{crashed.prefix}:key:lmaas-k:leases"
    assert await probe.zcard(leases) > 0  # slots held as credit
    book = crashed._credit
    assert book is not None and book._keeper is not None and crashed._refresher is not None
    book._keeper.cancel()  # the gateway "dies": no refresh, no give-back
    crashed._refresher.cancel()
    crashed._credit = None
    await asyncio.sleep(0.7)
    running, _ = await _hammer([other], subjects, 64, finish=False)
    assert len(running) == 64  # every slot is back
    rpm_fields = await probe.hgetall(f"{crashed.prefix}:key:lmaas-k:rpm")
    assert not _credit_fields(rpm_fields)  # the bucket credit ended (the admission dropped it)


async def test_refusals_when_credit_runs_out_carry_retry_after(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    subjects = [Subject("key", "lmaas-k", Limits(rpm=320, tpm=10**6))]
    admitted, refused = await _hammer([limiter], subjects, 400, tokens=10, wave=1)
    assert 320 - 20 <= len(admitted) <= 330
    assert refused and all(isinstance(r, RateLimitError) for r in refused)
    assert all("320 requests per minute" in str(r) for r in refused)
    assert {r.retry_after_s for r in refused if isinstance(r, RateLimitError)} == {1}
    tokens = [Subject("key", "lmaas-t", Limits(tpm=32_000))]
    admitted, refused = await _hammer([limiter], tokens, 400, tokens=100, wave=1)
    assert 320 - 20 <= len(admitted) <= 330
    assert refused and all("tokens per minute" in str(r) for r in refused)
    assert all(1 <= r.retry_after_s <= 2 for r in refused if isinstance(r, RateLimitError))


async def test_redis_going_away_never_over_admits(
    make_limiter: MakeLimiter, probe: aioredis.Redis
) -> None:
    limiter = await make_limiter()
    subjects = [Subject("key", "lmaas-k", Limits(rpm=3200))]  # credit: at most 200
    await _hammer([limiter], subjects, 300)
    await asyncio.sleep(0.05)
    rpm_key = f"{limiter.prefix}:key:lmaas-k:rpm"
    held = int((await probe.hgetall(rpm_key))[f"h:{limiter._lease_prefix[:-1]}"])
    client = limiter._client
    client.address = RedisAddress(port=1)  # refills now fail, as admissions do
    if client._connection is not None:
        client._connection.abort(OSError("Redis went away"))
    admitted = 0
    unavailable = 0
    for _ in range(400):
        try:
            await limiter.admit_async(subjects, 0)
        except ServiceUnavailableError:
            unavailable += 1
        else:
            admitted += 1
    assert admitted <= held  # the credit it held, and not one more
    assert unavailable >= 400 - held


async def test_credit_is_a_setting_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmaas.bootstrap.settings import Settings
    from lmaas.bootstrap.wiring import build_limiter

    monkeypatch.setenv("LMAAS_LIMITS__BACKEND", "redis")
    for value, expected in ((None, True), ("false", False), ("true", True)):
        if value is None:
            monkeypatch.delenv("LMAAS_LIMITS__REDIS_CREDIT", raising=False)
        else:
            monkeypatch.setenv("LMAAS_LIMITS__REDIS_CREDIT", value)
        limiter = build_limiter(Settings())
        assert isinstance(limiter, RedisLimiter)
        assert (limiter._credit is not None) is expected
        await limiter.aclose()
