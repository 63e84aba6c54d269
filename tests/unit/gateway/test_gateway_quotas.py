"""Quotas per UTC day or month: parsing, windows, the in-process limiter (fake clocks, a fake
quota source), the limited engine view, the store and the usage table as the durable source."""

from __future__ import annotations

import asyncio
import io
import wave
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lmaas.core.errors import InvalidRequestError, QuotaExceededError, RateLimitError
from lmaas.core.messages import (
    ChatMessage,
    ClassifyRequest,
    ClassifyResult,
    GenerateRequest,
    SamplingParams,
    TensorData,
    TranscribeRequest,
    TranscriptionResult,
)
from lmaas.gateway.keys import Principal, Scope
from lmaas.gateway.limited import LimitedEngineClient, charge_of
from lmaas.gateway.limits import InProcessLimiter, Limits, Subject
from lmaas.gateway.quotas import (
    Charge,
    Consumed,
    Quota,
    QuotaMetric,
    QuotaPeriod,
    Window,
    check_quotas,
    estimate_audio_seconds,
    make_quota,
    parse_quota,
    window_of,
)
from lmaas.gateway.service import GovernanceService
from lmaas.gateway.usage import UsageMeter
from lmaas.gateway.usage_store import SqlUsageStore, UsageRecord
from lmaas.testing.fakes import FakeEngineClient
from tests.unit.gateway.gov_helpers import FakeClock

pytestmark = pytest.mark.anyio


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingSource:
    """A quota source that answers fixed amounts and counts its loads."""

    def __init__(self, consumed: Consumed | None = None) -> None:
        self.consumed_value = consumed or Consumed()
        self.loads: list[tuple[str, str, str]] = []

    async def consumed(self, kind: str, name: str, window: Window) -> Consumed:
        self.loads.append((kind, name, window.id))
        await asyncio.sleep(0)
        return Consumed(**{m.value: self.consumed_value.get(m) for m in QuotaMetric})


def _quota(text: str, metric: str = "requests") -> Quota:
    quota = parse_quota(metric, text)
    assert quota is not None
    return quota


def _subject(*quotas: Quota, name: str = "lmaas-k", **limits: int) -> Subject:
    return Subject("key", name, Limits(**limits, quotas=quotas))


def _limiter(
    wall: FakeClock, source: RecordingSource | None = None
) -> tuple[InProcessLimiter, Monotonic]:
    clock = Monotonic()
    return InProcessLimiter(clock, wall_clock=wall, quota_source=source), clock


def test_quotas_parse_check_and_print() -> None:
    assert _quota("1000000/month", "tokens") == Quota(
        QuotaMetric.TOKENS, 1_000_000.0, QuotaPeriod.MONTH
    )
    assert _quota(" 12.5 / day", "audio_seconds").text == "12.5 audio s/day"
    assert parse_quota("images", "0") is None
    for bad in ("10", "10/week", "-1/day", "abc/day", "0/day"):
        with pytest.raises(InvalidRequestError):
            parse_quota("tokens", bad)
    with pytest.raises(InvalidRequestError, match="whole number"):
        parse_quota("requests", "1.5/day")
    with pytest.raises(InvalidRequestError, match="unknown quota metric"):
        make_quota("bytes", 1, "day")
    with pytest.raises(InvalidRequestError, match="two tokens quotas per day"):
        check_quotas([_quota("1/day", "tokens"), _quota("2/day", "tokens")])
    with pytest.raises(InvalidRequestError):
        Limits(quotas=(_quota("1/day"), _quota("3/day"))).checked()


def test_windows_are_utc_calendar_days_and_months() -> None:
    late = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)
    day = window_of(QuotaPeriod.DAY, late)
    assert (day.id, day.end) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC))
    month = window_of(QuotaPeriod.MONTH, late)
    assert (month.id, month.start, month.end) == (
        "2026-12",
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    # another offset, same instant: the UTC window
    from_tokyo = late.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    assert window_of(QuotaPeriod.DAY, from_tokyo).id == "2026-12-31"
    assert window_of(QuotaPeriod.MONTH, datetime(2026, 2, 10, tzinfo=UTC)).end == datetime(
        2026, 3, 1, tzinfo=UTC
    )


async def test_a_requests_quota_refuses_until_the_day_ends() -> None:
    wall = FakeClock()
    wall.now = datetime(2026, 3, 5, 22, 0, 0, tzinfo=UTC)
    limiter, _ = _limiter(wall)
    subject = [_subject(_quota("3/day"))]
    for _ in range(3):
        (await limiter.admit_async(subject, 0)).finish(0)
    with pytest.raises(QuotaExceededError, match="used 3 of its quota of 3 requests/day") as no:
        await limiter.admit_async(subject, 0)
    assert isinstance(no.value, RateLimitError) and no.value.code == "quota_exceeded"
    assert no.value.retry_after_s == 2 * 3600  # until 00:00 UTC
    wall.advance(hours=2)  # the next day: a fresh window
    (await limiter.admit_async(subject, 0)).finish(0)


async def test_tokens_are_reserved_then_settled_against_the_quota() -> None:
    wall = FakeClock()
    limiter, _ = _limiter(wall)
    subject = [_subject(_quota("100/month", "tokens"))]
    first = await limiter.admit_async(subject, 60)
    with pytest.raises(QuotaExceededError, match="100 tokens/month"):
        await limiter.admit_async(subject, 50)
    first.finish(10)  # used 10 of the 60 reserved
    second = await limiter.admit_async(subject, 50)
    second.finish(85)  # used more than reserved: the window now holds 95
    with pytest.raises(QuotaExceededError) as refused:
        await limiter.admit_async(subject, 6)
    assert refused.value.retry_after_s == 31 * 86400  # to Feb 1st
    (await limiter.admit_async(subject, 5)).finish(5)  # exactly to the limit
    with pytest.raises(QuotaExceededError):  # used up: even a request of 0 tokens
        await limiter.admit_async(subject, 0)


async def test_a_request_larger_than_the_quota_is_told_to_lower_max_tokens() -> None:
    limiter, _ = _limiter(FakeClock())
    with pytest.raises(QuotaExceededError, match="lower max_tokens") as refused:
        await limiter.admit_async([_subject(_quota("50/day", "tokens"))], 51)
    assert refused.value.param == "max_tokens"


async def test_windows_load_from_the_source_once_and_count_on() -> None:
    wall = FakeClock()
    source = RecordingSource(Consumed(requests=8))
    limiter, _ = _limiter(wall, source)
    subject = [_subject(_quota("10/day"), _quota("100/month"))]
    assert len(limiter.unseeded(subject)) == 2
    results = await asyncio.gather(
        *(limiter.admit_async(subject, 0) for _ in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 2  # 8 used before
    assert all(isinstance(r, QuotaExceededError) for r in results if isinstance(r, BaseException))
    assert sorted(source.loads) == [("key", "lmaas-k", "2026-01"), ("key", "lmaas-k", "2026-01-01")]
    assert limiter.unseeded(subject) == []
    wall.advance(days=1)  # a new day window loads again; the month window is kept
    assert [w.id for _, w in limiter.unseeded(subject)] == ["2026-01-02"]


async def test_a_refusal_takes_nothing_from_the_rate_limits_nor_other_windows() -> None:
    limiter, _ = _limiter(FakeClock())
    tenant = Subject("tenant", "t", Limits(quotas=(_quota("2/day"),)))
    key = _subject(rpm=100)
    for _ in range(2):
        (await limiter.admit_async([key, tenant], 0)).finish(0)
    with pytest.raises(QuotaExceededError, match="tenant t"):
        await limiter.admit_async([key, tenant], 0)
    # the refused request took no rpm: 98 more fit (another tenant, no quota)
    for _ in range(98):
        limiter.admit([key], 0).finish(0)
    with pytest.raises(RateLimitError, match="requests per minute"):
        limiter.admit([key], 0)


async def test_images_and_audio_seconds_are_charged_from_the_request() -> None:
    limiter, _ = _limiter(FakeClock())
    images = [_subject(_quota("5/day", "images"))]
    (await limiter.admit_async(images, 0, Charge(images=3))).finish(0)
    with pytest.raises(QuotaExceededError, match="needs 3"):
        await limiter.admit_async(images, 0, Charge(images=3))
    (await limiter.admit_async(images, 0, Charge(images=2))).finish(0)

    audio = [_subject(_quota("60/day", "audio_seconds"), name="lmaas-a")]
    held = await limiter.admit_async(audio, 0, Charge(audio_seconds=10.0))
    held.finish(0, audio_seconds=55.0)  # the worker measured 55 s (an mp3 the gateway can't read)
    with pytest.raises(QuotaExceededError, match="needs 6"):
        await limiter.admit_async(audio, 0, Charge(audio_seconds=6.0))
    (await limiter.admit_async(audio, 0, Charge(audio_seconds=5.0))).finish(0)


def _wav(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(b"\0\0" * int(seconds * rate))
    return out.getvalue()


def test_the_charge_of_a_request_is_read_from_what_it_carries() -> None:
    assert estimate_audio_seconds(_wav(2.5)) == pytest.approx(2.5)
    assert estimate_audio_seconds(b"ID3\x04 not a wav") == 0.0
    assert estimate_audio_seconds(b"RIFF\0\0\0\0WAVEjunk") == 0.0
    assert charge_of(TranscribeRequest("r", _wav(1.0))) == Charge(audio_seconds=1.0)
    assert charge_of(ClassifyRequest("r", images=[b"a", b"b"])) == Charge(images=2)
    data = np.zeros((4, 3, 8, 8), np.float32).tobytes()
    pixels = TensorData("pixel_values", "FP32", [4, 3, 8, 8], data)
    assert charge_of(ClassifyRequest("r", pixel_values=pixels)) == Charge(images=4)
    assert charge_of(ClassifyRequest("r", texts=["x"])) == Charge()


def _chat(max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        "r", messages=[ChatMessage("user", "hi")], sampling=SamplingParams(max_tokens=max_tokens)
    )


async def test_the_limited_engine_loads_a_window_before_a_stream_then_settles_it() -> None:
    wall = FakeClock()
    source = RecordingSource(Consumed(tokens=900))
    limiter, _ = _limiter(wall, source)
    quotas = (make_quota("tokens", 1000, "day"),)
    principal = Principal("k", "t", frozenset({Scope.INFERENCE}), key_limits=Limits(quotas=quotas))
    engine = LimitedEngineClient(FakeEngineClient(), principal, limiter)
    stream = engine.generate("fake-chat", _chat(50))  # window unknown: admitted on first item
    deltas = [d async for d in stream]
    used = sum(d.prompt_tokens + d.num_new_tokens for d in deltas)
    assert source.loads == [("key", "lmaas-k", "2026-01-01")]
    window = limiter._windows[("key", "lmaas-k", QuotaPeriod.DAY)][1]
    assert window.tokens == 900 + used and window.requests == 1
    with pytest.raises(QuotaExceededError):  # now the window is known: refused at the call
        engine.generate("fake-chat", _chat(1000 - int(window.tokens)))


def test_the_store_keeps_quotas_and_the_audit_shows_them(governance: GovernanceService) -> None:
    quotas = (make_quota("tokens", 1e6, "month"), make_quota("requests", 100, "day"))
    governance.create_tenant("team", limits=Limits(rpm=5, quotas=quotas))
    tenant = governance.get_tenant("team")
    assert tenant.limits.quotas == check_quotas(quotas)
    issued = governance.create_key("team", ["inference"], limits=Limits(quotas=quotas[:1]))
    key = governance.get_key(issued.key.id)
    assert key.limits == Limits(quotas=quotas[:1])
    governance.set_key_limits(key.id, Limits(tpm=10))
    assert governance.get_key(key.id).limits == Limits(tpm=10)
    principal = governance.authenticate_sync(issued.secret)
    assert principal.tenant_limits.quotas == check_quotas(quotas) and principal.is_limited
    rows = governance.list_audit(action="key.limits")
    assert rows[0].before is not None and rows[0].before["limits"]["quotas"] == [
        {"metric": "tokens", "limit": 1e6, "period": "month"}
    ]


async def test_the_usage_table_is_the_durable_source_of_the_windows(gov_database_url: str) -> None:
    store = SqlUsageStore(gov_database_url)
    meter = UsageMeter(store, flush_interval_s=60)
    await meter.start()
    try:
        day = datetime(2026, 5, 20, 12, tzinfo=UTC)

        def record(at: datetime, key: str = "aaaaaaaaaaaa", **counts: float) -> UsageRecord:
            return UsageRecord("r", "m", 200, tenant="t", key_id=key, at=at, **counts)  # type: ignore[arg-type]

        store.insert(
            [
                record(day, prompt_tokens=10, completion_tokens=5),
                record(day - timedelta(days=1), embedding_tokens=7, images=2),
                record(day - timedelta(days=30), prompt_tokens=1000),  # April
                record(day, key="bbbbbbbbbbbb", audio_seconds=3.5),
            ]
        )
        meter.record(record(day, completion_tokens=100))  # buffered: written before the load
        month = await meter.consumed("key", "lmaas-aaaaaaaaaaaa", window_of(QuotaPeriod.MONTH, day))
        assert month == Consumed(tokens=122, requests=3, audio_seconds=0, images=2)
        today = await meter.consumed("key", "aaaaaaaaaaaa", window_of(QuotaPeriod.DAY, day))
        assert today == Consumed(tokens=115, requests=2)
        tenant = await meter.consumed("tenant", "t", window_of(QuotaPeriod.DAY, day))
        assert tenant == Consumed(tokens=115, requests=3, audio_seconds=3.5)
    finally:
        await meter.aclose()
        meter.close()


async def test_the_limited_engine_charges_images_and_settles_audio_seconds() -> None:
    limiter, _ = _limiter(FakeClock())
    quotas = (make_quota("images", 4, "day"), make_quota("audio_seconds", 10, "day"))
    principal = Principal("k", "t", frozenset({Scope.INFERENCE}), key_limits=Limits(quotas=quotas))
    fake = FakeEngineClient()

    async def classify(model: str, request: object) -> ClassifyResult:
        return ClassifyResult("r", b"", 3, 1)

    async def transcribe(model: str, request: object) -> TranscriptionResult:
        return TranscriptionResult("r", "hi", "en", duration_s=7.5)  # an mp3 the gateway can't time

    fake.infer_handlers[ClassifyRequest] = classify
    fake.infer_handlers[TranscribeRequest] = transcribe
    engine = LimitedEngineClient(fake, principal, limiter)
    await engine.infer("fake-embed", ClassifyRequest("r", images=[b"a", b"b", b"c"]))
    with pytest.raises(QuotaExceededError, match="used 3 of its quota of 4 images/day"):
        await engine.infer("fake-embed", ClassifyRequest("r", images=[b"a", b"b"]))
    await engine.infer("fake-embed", TranscribeRequest("r", b"ID3 mp3 bytes"))  # admitted at 0 s
    window = limiter._windows[("key", "lmaas-k", QuotaPeriod.DAY)][1]
    assert (window.images, window.audio_seconds, window.requests) == (3, 7.5, 2)
    await engine.infer("fake-embed", TranscribeRequest("r", _wav(2.0)))  # 7.5 + 2 <= 10
    with pytest.raises(QuotaExceededError, match="audio s/day"):
        await engine.infer("fake-embed", TranscribeRequest("r", _wav(1.0)))  # 9.5 + 1 > 10
