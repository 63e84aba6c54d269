"""The in-process limiter (fake clock) and the limited engine view (fake engine)."""

from __future__ import annotations

import asyncio

import pytest

from lmaas.core.errors import InvalidRequestError, ModelNotFoundError, RateLimitError
from lmaas.core.messages import ChatMessage, EmbedRequest, GenerateRequest, SamplingParams
from lmaas.gateway.keys import Principal, Scope
from lmaas.gateway.limited import LimitedEngineClient, estimate_prompt_tokens
from lmaas.gateway.limits import InProcessLimiter, Limits, Subject
from lmaas.testing.fakes import FakeEngineClient

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(**limits: int) -> Subject:
    return Subject("key", "lmaas-k", Limits(**limits))


def test_requests_per_minute_is_a_bucket_that_refills() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock)
    subject = [_key(rpm=3)]
    for _ in range(3):
        limiter.admit(subject, 0).finish(0)
    with pytest.raises(RateLimitError, match="3 requests per minute") as refused:
        limiter.admit(subject, 0)
    assert refused.value.retry_after_s == 20  # one request refills in 60/3 s
    clock.now += 19
    with pytest.raises(RateLimitError):
        limiter.admit(subject, 0)
    clock.now += 1
    limiter.admit(subject, 0)


def test_tokens_are_reserved_then_settled_to_the_real_count() -> None:
    clock = Clock()
    limiter = InProcessLimiter(clock)
    subject = [_key(tpm=100)]
    first = limiter.admit(subject, 60)
    with pytest.raises(RateLimitError, match="100 tokens per minute") as refused:
        limiter.admit(subject, 50)
    assert refused.value.retry_after_s == 6  # 10 tokens short at 100/60 per second
    first.finish(10)  # used 10 of the 60 reserved: 50 go back
    second = limiter.admit(subject, 50)
    second.finish(140)  # used more than reserved: the bucket goes below zero
    with pytest.raises(RateLimitError):
        limiter.admit(subject, 1)
    clock.now += 60  # 100 refilled, but 50 tokens of debt came first
    with pytest.raises(RateLimitError):
        limiter.admit(subject, 100)
    clock.now += 30
    limiter.admit(subject, 100)


def test_a_request_larger_than_the_tpm_limit_is_refused_with_a_hint() -> None:
    limiter = InProcessLimiter(Clock())
    with pytest.raises(RateLimitError, match="lower max_tokens") as refused:
        limiter.admit([_key(tpm=100)], 101)
    assert refused.value.param == "max_tokens"


def test_concurrency_is_held_until_the_request_finishes() -> None:
    limiter = InProcessLimiter(Clock())
    subject = [_key(max_concurrent=2)]
    a = limiter.admit(subject, 0)
    limiter.admit(subject, 0)
    with pytest.raises(RateLimitError, match="limit of concurrent requests"):
        limiter.admit(subject, 0)
    a.finish(0)
    a.finish(0)  # settling twice frees one slot only
    limiter.admit(subject, 0)
    with pytest.raises(RateLimitError):
        limiter.admit(subject, 0)


def test_a_refused_request_takes_nothing_and_tenants_are_shared() -> None:
    limiter = InProcessLimiter(Clock())
    tenant = Subject("tenant", "team", Limits(rpm=2))
    key_a, key_b = Subject("key", "a", Limits(rpm=5)), Subject("key", "b", Limits(rpm=5))
    limiter.admit([key_a, tenant], 0)
    limiter.admit([key_b, tenant], 0)
    for key in (key_a, key_b):
        with pytest.raises(RateLimitError, match="tenant team"):
            limiter.admit([key, tenant], 0)
    # key_a took 1 of 5 and its refused tries took nothing: 4 more pass without the tenant
    for _ in range(4):
        limiter.admit([key_a], 0)
    with pytest.raises(RateLimitError, match="key a"):
        limiter.admit([key_a], 0)


def test_changing_a_limit_keeps_what_was_used() -> None:
    limiter = InProcessLimiter(Clock())
    for _ in range(10):
        limiter.admit([_key(rpm=10)], 0)
    for _ in range(10):  # raised to 20 with 10 used: room for 10 more, not a fresh 20
        limiter.admit([_key(rpm=20)], 0)
    with pytest.raises(RateLimitError):
        limiter.admit([_key(rpm=20)], 0)


def test_limits_must_be_positive() -> None:
    for bad in (Limits(rpm=0), Limits(tpm=-1), Limits(max_concurrent=0)):
        with pytest.raises(InvalidRequestError, match="positive integer"):
            bad.checked()
    assert Limits(rpm=1).checked().any and not Limits().any


async def test_concurrent_admissions_never_overspend() -> None:
    """AU-5: 20 requests at once, each reserving 3 tokens against 10 per minute: at most 3."""
    limiter = InProcessLimiter(Clock())
    subject = [_key(tpm=10)]
    admitted: list[int] = []

    async def one(i: int) -> None:
        await asyncio.sleep(0)
        try:
            limiter.admit(subject, 3)
        except RateLimitError:
            return
        admitted.append(i)

    await asyncio.gather(*(one(i) for i in range(20)))
    assert len(admitted) == 3


def _principal(**limits: int) -> Principal:
    return Principal("k1", "team", frozenset({Scope.INFERENCE}), ("*",), Limits(**limits))


def _generate(text: str, max_tokens: int | None) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=max_tokens)
    return GenerateRequest("r", sampling, messages=[ChatMessage("user", text)])


async def test_a_stream_settles_to_its_real_tokens() -> None:
    limiter = InProcessLimiter(Clock())
    engine = LimitedEngineClient(FakeEngineClient(), _principal(tpm=100), limiter)
    request = _generate("one two three", max_tokens=50)
    reserved = estimate_prompt_tokens(request) + 50
    stream = engine.generate("fake-chat", request)
    used = 0
    async for delta in stream:
        used += delta.prompt_tokens + delta.num_new_tokens
    assert 0 < used < reserved
    # everything but what was used is back: a request of (100 - used) tokens fits, one more not
    with pytest.raises(RateLimitError):
        limiter.admit([Subject("key", "lmaas-k1", Limits(tpm=100))], 100 - used + 1)
    limiter.admit([Subject("key", "lmaas-k1", Limits(tpm=100))], 100 - used)


async def test_closing_a_stream_before_its_first_token_frees_the_slot() -> None:
    limiter = InProcessLimiter(Clock())
    engine = LimitedEngineClient(FakeEngineClient(), _principal(max_concurrent=1), limiter)
    stream = engine.generate("fake-chat", _generate("hi", 4))
    with pytest.raises(RateLimitError):
        engine.generate("fake-chat", _generate("hi", 4))
    await stream.aclose()  # type: ignore[attr-defined]
    await engine.embed("fake-embed", EmbedRequest("r", texts=["a b"]))
    with pytest.raises(ModelNotFoundError):
        await engine.embed("nope", EmbedRequest("r", texts=["a"]))
    engine.generate("fake-chat", _generate("hi", 4))  # the failed call freed its slot too


def test_prompt_estimates() -> None:
    assert estimate_prompt_tokens(EmbedRequest("r", token_ids=[[1, 2], [3]])) == 3
    assert estimate_prompt_tokens(EmbedRequest("r", texts=["abcdefgh"])) == 3
    ids = GenerateRequest("r", SamplingParams(), prompt_token_ids=[1, 2, 3, 4])
    assert estimate_prompt_tokens(ids) == 4
