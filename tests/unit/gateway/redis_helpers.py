"""Fixtures' helpers of the Redis limiter tests: a probe client and limiters under one fresh
key prefix (skipped without a Redis at 127.0.0.1:6379)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lmaas.gateway.redis_limits import RedisLimiter
from lmaas.gateway.resp import RespClient

REDIS_URL = "redis://127.0.0.1:6379/0"

MakeLimiter = Callable[..., Awaitable[RedisLimiter]]


@asynccontextmanager
async def redis_probe() -> AsyncIterator[aioredis.Redis]:
    """A redis-py client to look at Redis from outside the limiter (skips without Redis)."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, decode_responses=True)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {exc}")
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def limiters(
    probe: aioredis.Redis, new_client: Callable[[], RespClient]
) -> AsyncIterator[MakeLimiter]:
    """A factory of limiters (each on its own client from ``new_client``, like separate
    gateways) under one fresh prefix; closes them and deletes their keys at the end."""
    prefix = f"lmaas-test:{uuid.uuid4().hex[:12]}"
    made: list[RedisLimiter] = []

    async def make(lease_ttl_s: float = 15.0, **options: Any) -> RedisLimiter:
        limiter = RedisLimiter(new_client(), prefix=prefix, lease_ttl_s=lease_ttl_s, **options)
        made.append(limiter)
        return limiter

    try:
        yield make
    finally:
        for limiter in made:
            await limiter.aclose()
        keys = [k async for k in probe.scan_iter(match=f"{prefix}:*")]
        if keys:
            await probe.delete(*keys)
