"""Tenants and keys through the service and the store, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import inspect, text

from lmaas.core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from lmaas.gateway.keys import Scope
from lmaas.gateway.limits import Limits
from lmaas.gateway.service import GovernanceService
from lmaas.gateway.store import ApiKey, SqlGovernanceStore
from lmaas.registry.metadata import create_db_engine, head_revision
from tests.unit.gateway.gov_helpers import FakeClock

pytestmark = pytest.mark.anyio


def test_the_migration_creates_the_governance_tables(
    governance: GovernanceService, gov_database_url: str
) -> None:
    engine = create_db_engine(gov_database_url)
    try:
        assert {"tenants", "api_keys", "models"} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            revisions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            assert revisions == [(head_revision(),)]
    finally:
        engine.dispose()


def test_tenants_create_list_show_delete(governance: GovernanceService) -> None:
    governance.create_tenant("team-b", "second")
    governance.create_tenant("team-a")
    assert [t.name for t in governance.list_tenants()] == ["team-a", "team-b"]
    assert governance.get_tenant("team-b").description == "second"
    with pytest.raises(ConflictError, match="already exists"):
        governance.create_tenant("team-a")
    with pytest.raises(InvalidRequestError, match="invalid tenant name"):
        governance.create_tenant("Team A")
    key = governance.create_key("team-a", ["inference"]).key
    governance.delete_tenant("team-a")
    with pytest.raises(NotFoundError):
        governance.get_tenant("team-a")
    with pytest.raises(NotFoundError):
        governance.get_key(key.id)  # the tenant's keys went with it
    with pytest.raises(NotFoundError):
        governance.delete_tenant("team-a")


async def test_a_key_authenticates_as_its_tenant_with_its_scopes(
    governance: GovernanceService,
) -> None:
    governance.create_tenant("team-a")
    issued = governance.create_key(
        "team-a", ["inference", "models:read"], ["tiny-*"], name="ci", expires_in="30d"
    )
    principal = await governance.authenticate(issued.secret)
    assert principal.key_id == issued.key.id and principal.tenant == "team-a"
    assert principal.scopes == {Scope.INFERENCE, Scope.MODELS_READ}
    assert principal.models == ("tiny-*",)
    shown = governance.get_key(issued.key.prefix)
    assert shown == issued.key and shown.name == "ci"
    assert [k.id for k in governance.list_keys("team-a")] == [issued.key.id]
    assert governance.list_keys("other") == []
    for wrong in (issued.secret.upper(), issued.secret[:-1], issued.secret[:-1] + "x", "x"):
        with pytest.raises(AuthenticationError, match="invalid API key"):
            await governance.authenticate(wrong)


async def test_the_db_holds_only_the_hash(
    governance: GovernanceService, gov_database_url: str
) -> None:
    governance.create_tenant("team-a")
    issued = governance.create_key("team-a", ["inference"])
    rotated = governance.rotate_key(issued.key.id)
    engine = create_db_engine(gov_database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM api_keys")).all()
    finally:
        engine.dispose()
    dump = repr(rows)
    secret_parts = [s.split("-", 2)[2] for s in (issued.secret, rotated.secret)]
    assert all(part not in dump for part in secret_parts)
    assert rotated.key.key_sha256 in dump


async def test_revoked_and_expired_keys_are_refused(
    governance: GovernanceService, clock: FakeClock
) -> None:
    governance.create_tenant("team-a")
    revoked = governance.create_key("team-a", ["inference"])
    governance.revoke_key(revoked.key.id)
    assert governance.revoke_key(revoked.key.id).revoked_at is not None  # twice: no-op
    with pytest.raises(AuthenticationError, match="has been revoked"):
        await governance.authenticate(revoked.secret)
    expiring = governance.create_key("team-a", ["inference"], expires_in="1h")
    await governance.authenticate(expiring.secret)
    clock.advance(hours=1)
    with pytest.raises(AuthenticationError, match="expired at"):
        await governance.authenticate(expiring.secret)
    assert governance.get_key(expiring.key.id).status(clock()) == "expired"
    with pytest.raises(InvalidRequestError, match="expired"):
        governance.rotate_key(expiring.key.id)
    renewed = governance.rotate_key(expiring.key.id, expires_in="1d")
    assert (await governance.authenticate(renewed.secret)).key_id == expiring.key.id
    with pytest.raises(ConflictError, match="revoked"):
        governance.rotate_key(revoked.key.id)


async def test_rotation_keeps_the_id_and_retires_the_old_secret(
    governance: GovernanceService,
) -> None:
    governance.create_tenant("team-a")
    old = governance.create_key("team-a", ["inference"], ["m1"])
    new = governance.rotate_key(old.key.prefix)
    assert new.key.id == old.key.id and new.secret != old.secret
    assert new.key.models == ("m1",) and new.key.rotated_at is not None
    with pytest.raises(AuthenticationError):
        await governance.authenticate(old.secret)
    assert (await governance.authenticate(new.secret)).key_id == old.key.id


async def test_the_admin_key_is_created_once_on_a_fresh_install(
    governance: GovernanceService,
) -> None:
    first = governance.bootstrap_admin_key()
    assert first is not None and first.key.tenant == "admin"
    assert first.key.scopes == {Scope.ADMIN}
    assert governance.bootstrap_admin_key() is None
    assert (await governance.authenticate(first.secret)).is_admin
    governance.create_tenant("ops")
    governance.create_key("ops", ["admin"])
    governance.revoke_key(first.key.id)
    assert governance.bootstrap_admin_key() is None  # a revoked admin key still counts


def test_an_admin_key_is_bootstrapped_when_only_other_tenants_exist(
    governance: GovernanceService,
) -> None:
    governance.create_tenant("admin")  # e.g. made with the CLI before the first start
    governance.create_tenant("team-a")
    governance.create_key("team-a", ["inference"])
    issued = governance.bootstrap_admin_key()
    assert issued is not None and issued.key.tenant == "admin"


def test_the_last_active_admin_key_cannot_be_removed(governance: GovernanceService) -> None:
    first = governance.bootstrap_admin_key()
    assert first is not None
    with pytest.raises(ConflictError, match="last active admin key"):
        governance.revoke_key(first.key.id)
    with pytest.raises(ConflictError, match="last active admin key"):
        governance.delete_tenant("admin")
    governance.create_tenant("ops")
    governance.create_key("ops", ["admin"])
    governance.revoke_key(first.key.id)
    governance.delete_tenant("admin")


def test_bad_key_requests_are_clear_errors(governance: GovernanceService) -> None:
    with pytest.raises(NotFoundError, match="tenant 'ghost' does not exist"):
        governance.create_key("ghost", ["inference"])
    governance.create_tenant("team-a")
    with pytest.raises(InvalidRequestError, match="unknown scope"):
        governance.create_key("team-a", ["write"])
    with pytest.raises(InvalidRequestError, match="invalid duration"):
        governance.create_key("team-a", ["inference"], expires_in="forever")
    with pytest.raises(InvalidRequestError, match="model pattern"):
        governance.create_key("team-a", ["inference"], ["../x"])
    with pytest.raises(NotFoundError, match="does not exist"):
        governance.get_key("lmaas-000000000000")
    with pytest.raises(InvalidRequestError, match="not a key id"):
        governance.get_key("nope")


async def test_the_cache_serves_hits_and_forgets_keys_changed_here(
    gov_database_url: str, clock: FakeClock
) -> None:
    from lmaas.gateway.store import SqlGovernanceStore

    store = SqlGovernanceStore(gov_database_url)
    cached = GovernanceService(store, key_cache_ttl_s=3600, clock=clock)
    other = GovernanceService(SqlGovernanceStore(gov_database_url), key_cache_ttl_s=0, clock=clock)
    try:
        cached.create_tenant("team-a")
        issued = cached.create_key("team-a", ["inference"])
        await cached.authenticate(issued.secret)
        other.revoke_key(issued.key.id)  # another process: seen after the TTL only
        assert (await cached.authenticate(issued.secret)).key_id == issued.key.id
        again = cached.create_key("team-a", ["inference"])
        await cached.authenticate(again.secret)
        cached.revoke_key(again.key.id)  # this process: at once
        with pytest.raises(AuthenticationError, match="revoked"):
            await cached.authenticate(again.secret)
    finally:
        cached.close()
        other.close()


class _CountingStore(SqlGovernanceStore):
    """Counts the key reads authentication makes."""

    reads = 0

    def get_key_for_auth(self, key_id: str) -> tuple[ApiKey, Limits, float] | None:
        self.reads += 1
        found = super().get_key_for_auth(key_id)
        time.sleep(0.05)  # a slow DB: requests keep arriving during the read
        return found


async def test_requests_missing_the_cache_together_share_one_read(
    gov_database_url: str, clock: FakeClock
) -> None:
    # Under load, an expired entry used to start one DB read per request arriving during the
    # read (a herd of threads); they now wait for the same read.
    store = _CountingStore(gov_database_url)
    cached = GovernanceService(store, key_cache_ttl_s=3600, clock=clock)
    try:
        cached.create_tenant("team-a")
        issued = cached.create_key("team-a", ["inference"])
        principals = await asyncio.gather(*(cached.authenticate(issued.secret) for _ in range(20)))
        assert {p.key_id for p in principals} == {issued.key.id} and store.reads == 1
        # A key revoked here while its read is in flight: the read (begun before the revocation)
        # answers its request, but is not cached, so the next request sees the revocation.
        again = cached.create_key("team-a", ["inference"])
        reading = asyncio.ensure_future(cached.authenticate(again.secret))
        await asyncio.sleep(0.01)
        cached.revoke_key(again.key.id)
        await reading
        with pytest.raises(AuthenticationError, match="revoked"):
            await cached.authenticate(again.secret)
        assert store.reads == 3
    finally:
        cached.close()


async def test_limits_are_stored_on_keys_and_tenants_and_reach_the_principal(
    governance: GovernanceService,
) -> None:
    governance.create_tenant("team-a", limits=Limits(rpm=100, tpm=None, max_concurrent=8))
    issued = governance.create_key("team-a", ["inference"], limits=Limits(rpm=10, tpm=5000))
    principal = await governance.authenticate(issued.secret)
    assert principal.key_limits == Limits(rpm=10, tpm=5000)
    assert principal.tenant_limits == Limits(rpm=100, max_concurrent=8)
    assert principal.is_limited
    governance.set_key_limits(issued.key.id, Limits(max_concurrent=2))
    governance.set_tenant_limits("team-a", Limits())
    principal = await governance.authenticate(issued.secret)
    assert principal.key_limits == Limits(max_concurrent=2)
    assert principal.tenant_limits == Limits()
    assert governance.get_key(issued.key.id).limits == Limits(max_concurrent=2)
    with pytest.raises(InvalidRequestError, match="positive integer"):
        governance.set_key_limits(issued.key.id, Limits(rpm=0))
    with pytest.raises(NotFoundError):
        governance.set_tenant_limits("ghost", Limits(rpm=1))
