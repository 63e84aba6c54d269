"""Fixtures for the HTTP API tests: the app over a FakeEngineClient, driven in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from lmaas.api import ApiServices, DefaultApiConfig, create_app
from lmaas.gateway.service import GovernanceService, IssuedKey
from lmaas.observability.metrics import Metrics
from lmaas.testing.fakes import FakeEngineClient

BASE_URL = "http://lmaas.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngineClient:
    return FakeEngineClient()


@pytest.fixture
def make_app() -> Callable[..., FastAPI]:
    def build(engine: FakeEngineClient | None = None, **kwargs: Any) -> FastAPI:
        config = DefaultApiConfig(
            max_body_bytes=kwargs.pop("max_body_bytes", 64 * 1024),
            request_timeout_s=kwargs.pop("request_timeout_s", 5.0),
        )
        services = ApiServices(
            engine=engine or FakeEngineClient(), config=config, metrics=Metrics(), **kwargs
        )
        return create_app(services)

    return build


@pytest.fixture
def app(make_app: Callable[..., FastAPI], engine: FakeEngineClient) -> FastAPI:
    return make_app(engine)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
        yield c


@pytest.fixture
def governance(tmp_path: Path) -> Iterator[GovernanceService]:
    """Governance on a fresh SQLite file (a module may override it with another database)."""
    service = GovernanceService.open(f"sqlite:///{tmp_path / 'lmaas.db'}", key_cache_ttl_s=5.0)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def admin(governance: GovernanceService) -> IssuedKey:
    """The first-start admin key of ``governance``."""
    issued = governance.bootstrap_admin_key()
    assert issued is not None
    return issued
