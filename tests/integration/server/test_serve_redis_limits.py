"""Two real gateways (``lmaas serve`` on the same home and DB) share their limits through the
real Redis (127.0.0.1:6379; skipped without it): hammered together, they never admit more than
the limit, and each 429 carries ``Retry-After``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.exceptions import RedisError

from lmaas.registry.service import RegistryService
from tests.integration.server.conftest import ECHO
from tests.integration.serverproc import ServerProcess, start_server

REDIS_URL = "redis://127.0.0.1:6379/0"


def _cli(home: Path, *args: str) -> str:
    env = {**os.environ, "LMAAS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmaas.cli", *args, "--home", str(home)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]
) -> Iterator[tuple[Path, list[ServerProcess]]]:
    """Two secure gateways on one home, limits in Redis under a prefix of their own."""
    probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        probe.ping()
    except (RedisError, OSError) as exc:
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {exc}")
    home = tmp_path_factory.mktemp("redis-home")
    registry = RegistryService(home, f"sqlite:///{home / 'lmaas.db'}", offline=True)
    options = {"runner": ECHO, "token_delay_s": "0.05"}
    registry.import_model(str(tiny_dirs["chat"]), name="echo", serving={"options": options})
    registry.close()
    prefix = f"lmaas-test:{uuid.uuid4().hex[:12]}"
    env = {
        "LMAAS_LIMITS__BACKEND": "redis",
        "LMAAS_REDIS_URL": REDIS_URL,
        "LMAAS_LIMITS__KEY_PREFIX": prefix,
        "LMAAS_AUTH__KEY_CACHE_TTL_S": "0",
    }
    first = start_server(home, ["echo"], auth=True, env=env)
    servers = [first]
    try:
        first.wait_ready(120)  # the first start creates the admin key; then the second
        second = start_server(home, ["echo"], auth=True, env=env)
        servers.append(second)
        second.wait_ready(120)
        yield home, servers
    finally:
        for server in servers:
            server.stop()
        keys = list(probe.scan_iter(match=f"{prefix}:*"))
        if keys:
            probe.delete(*keys)
        probe.close()


async def _hammer(
    servers: list[ServerProcess], key: str, count: int, max_tokens: int
) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "echo", "prompt": " ".join(["w"] * 40), "max_tokens": max_tokens}
    async with httpx.AsyncClient(timeout=60) as client:
        calls = [
            client.post(f"{servers[i % 2].base_url}/v1/completions", json=body, headers=headers)
            for i in range(count)
        ]
        return list(await asyncio.gather(*calls))


def _check_refusals(responses: list[httpx.Response]) -> int:
    admitted = 0
    for response in responses:
        if response.status_code == 200:
            admitted += 1
            continue
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    return admitted


def test_two_gateways_never_admit_past_a_shared_rpm(
    gateways: tuple[Path, list[ServerProcess]],
) -> None:
    home, servers = gateways
    _cli(home, "tenants", "create", "rpm-team")
    key = _cli(
        home, "keys", "create", "--tenant", "rpm-team", "--scope", "inference", "--rpm", "12"
    )
    started = time.monotonic()
    responses = asyncio.run(_hammer(servers, key, 60, max_tokens=1))
    elapsed = time.monotonic() - started
    admitted = _check_refusals(responses)
    refill = int(elapsed * 12 / 60)  # the bucket refills 12/min while the hammering lasts
    assert 12 <= admitted <= 12 + refill, (admitted, elapsed)
    # each gateway alone would have admitted 12 of its 30: together they admitted 12 in all
    assert sum(r.status_code == 429 for r in responses[0::2]) > 0
    assert sum(r.status_code == 429 for r in responses[1::2]) > 0


def test_two_gateways_share_a_concurrency_limit(
    gateways: tuple[Path, list[ServerProcess]],
) -> None:
    home, servers = gateways
    _cli(home, "tenants", "create", "conc-team", "--max-concurrent", "3")
    key = _cli(home, "keys", "create", "--tenant", "conc-team", "--scope", "inference")
    # each request streams 30 tokens at 50 ms: ~1.5 s in flight, while all 16 arrive
    responses = asyncio.run(_hammer(servers, key, 16, max_tokens=30))
    assert _check_refusals(responses) == 3
    # the slots came back: the next request passes (on either gateway)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "echo", "prompt": "a b", "max_tokens": 1}
    for server in servers:
        answer = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers)
        assert answer.status_code == 200, answer.text


def test_two_gateways_never_admit_past_a_shared_quota(
    gateways: tuple[Path, list[ServerProcess]],
) -> None:
    home, servers = gateways
    _cli(home, "tenants", "create", "quota-team")
    key = _cli(
        home,
        "keys",
        "create",
        "--tenant",
        "quota-team",
        "--scope",
        "inference",
        "--quota-requests",
        "10/day",
    )
    responses = asyncio.run(_hammer(servers, key, 40, max_tokens=1))
    assert sum(r.status_code == 200 for r in responses) == 10
    refused = [r for r in responses if r.status_code != 200]
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "quota_exceeded"
        assert int(response.headers["retry-after"]) >= 1
    assert sum(r.status_code == 429 for r in responses[0::2]) > 0
    assert sum(r.status_code == 429 for r in responses[1::2]) > 0
    # Redis loses the quota windows (a restart without persistence): the gateways load them
    # again from the usage table, so the used-up quota stays used up.
    time.sleep(1.0)  # past the usage flush interval: both gateways' records are in the DB
    probe = redis.Redis.from_url(REDIS_URL)
    try:
        windows = list(probe.scan_iter(match=f"*:key:lmaas-{key[6:18]}:quota:*"))
        assert len(windows) == 1
        probe.delete(*windows)
    finally:
        probe.close()
    again = asyncio.run(_hammer(servers, key, 4, max_tokens=1))
    assert [r.status_code for r in again] == [429] * 4
