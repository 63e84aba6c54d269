"""Fixtures of the governance tests: a fresh metadata DB on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from lmaas.gateway.service import GovernanceService
from lmaas.gateway.store import SqlGovernanceStore
from tests.unit.gateway.gov_helpers import FakeClock

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_reachable() -> str | None:
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def gov_postgres_skip_reason() -> str | None:
    return _postgres_reachable()


@pytest.fixture(params=["sqlite", "postgresql"])
def gov_database_url(
    request: pytest.FixtureRequest, tmp_path: Path, gov_postgres_skip_reason: str | None
) -> Iterator[str]:
    """A fresh, empty metadata DB: a SQLite file, or a private schema in PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lmaas.db'}"
        return
    if gov_postgres_skip_reason is not None:
        pytest.skip(gov_postgres_skip_reason)
    schema = f"lmaas_gov_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def governance(gov_database_url: str, clock: FakeClock) -> Iterator[GovernanceService]:
    """The service over a fresh DB, with a fake clock and no key cache."""
    service = GovernanceService(
        SqlGovernanceStore(gov_database_url), key_cache_ttl_s=0.0, clock=clock
    )
    try:
        yield service
    finally:
        service.close()
