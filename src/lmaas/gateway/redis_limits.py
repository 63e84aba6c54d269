"""Rate limits shared by several gateways: the in-process limiter's rules, kept in Redis.

The semantics are those of :class:`lmaas.gateway.limits.InProcessLimiter` (requests and tokens
per minute are token buckets refilling at limit/60 per second; tokens are reserved at admission
and settled at the end; concurrency is counted while a request runs; the key and its tenant are
checked, then taken from, all or nothing). What changes is where the state lives and what makes
admission atomic (quotas per day or month too: :mod:`lmaas.gateway.quotas`):

* Each check-and-take is **one Lua script** run by Redis (``EVALSHA`` through the lean client
  of :mod:`lmaas.gateway.resp`, loaded again if Redis forgot it; the scripts and the key layout:
  :mod:`lmaas.gateway.redis_scripts`). Redis runs one script at a time, so N gateways admitting
  at once can never pass a limit together, and a refused request takes nothing.
* Time is Redis's clock (``TIME`` inside the script), so the gateways' clocks do not matter.
* Concurrency slots are **leases**: a sorted set per subject whose members are the admitted
  requests, scored by when their lease ends. Admission first drops ended leases, then counts.
  While a request runs its gateway refreshes the lease (every third of ``lease_ttl_s``); when it
  ends the lease is removed. A gateway that dies (SIGKILL, power cut, a partition) stops
  refreshing, and its slots come back by themselves within ``lease_ttl_s``.
* Buckets are hashes (``level``, ``ts``, ``cap``) that expire once they would be full again, so
  idle keys cost Redis nothing.
* Quota windows are hashes per subject and UTC day or month; one Redis does not hold yet is
  loaded from the usage table first (:mod:`lmaas.gateway.redis_windows`).
* **Local credit** (``credit=True``, the default; :mod:`lmaas.gateway.redis_credit`): a busy
  gateway takes each limit in small chunks ahead of its requests, with the same scripts' rules,
  and admits from what it holds with no round trip; what it holds counts as taken in Redis, so
  the gateways together still never pass a limit. ``credit=False`` runs one script per
  admission.

Redis down means **closed**: admission fails with 503 (``ServiceUnavailableError``, retryable)
rather than serving past limits nobody can check (credit already held is used until it ends).
Settling is best effort: if it fails, the lease still expires and the unused reservation simply
is not refunded (conservative). A settle is not awaited: it is written after the request's
response, with the next admission or within 20 ms (``RespClient.defer_s``), so a slot or a
refund comes back at most that much later (under load most settles ride with an admission: one
write, one wake-up of Redis); an admission from credit settles into the credit (no I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from lmaas.core.errors import RateLimitError, ServiceUnavailableError
from lmaas.gateway.limits import Subject, rate_limit_error
from lmaas.gateway.quotas import (
    NO_CHARGE,
    Charge,
    Quota,
    QuotaSource,
    Window,
    ZeroSource,
    cost_of,
    quota_error,
)
from lmaas.gateway.redis_credit import Plan, credited_quotas
from lmaas.gateway.redis_credit_book import CreditBook
from lmaas.gateway.redis_scripts import (
    ADMIT_LUA,
    REFRESH_LUA,
    SETTLE_LUA,
    AdmitCommand,
    AdmitWindows,
    admit_command,
    settle_command,
)
from lmaas.gateway.redis_windows import RedisWindows, unavailable
from lmaas.gateway.resp import RedisError, RespClient, Script

_log = logging.getLogger(__name__)

_REASONS = {1: "concurrency", 2: "rpm", 3: "too_large", 4: "tpm"}
_UNSEEDED = 5
_QUOTA = 6
_SEED_ATTEMPTS = 3
_MAX_CREDIT_TTL_S = 30.0
"""Bucket credit lives at most this long unrenewed (the buckets' hashes live 60 s or more)."""


class RedisAdmission:
    """One admitted request's hold; :meth:`finish` settles it (once), without awaiting: the
    settle runs as its own task, so it also happens when the request's task is being cancelled
    (a cancelled scope would cancel any ``await`` made in its ``finally``)."""

    __slots__ = (
        "_charge",
        "_done",
        "_held",
        "_lease",
        "_limiter",
        "_plan",
        "_subjects",
        "_windows",
        "reserved_tokens",
    )

    def __init__(
        self,
        limiter: RedisLimiter,
        subjects: Sequence[Subject],
        lease: str,
        held: list[str],
        tokens: int,
        windows: list[str],
        charge: Charge,
        plan: Plan | None = None,
    ) -> None:
        self._limiter = limiter
        self._subjects = subjects
        self._lease = lease
        self._held = held
        self._windows = windows
        self._charge = charge
        self._plan = plan
        self._done = False
        self.reserved_tokens = tokens

    def finish(self, used_tokens: int, audio_seconds: float | None = None) -> None:
        """Release the concurrency leases and settle the reservation to ``used_tokens`` (and
        the audio seconds charged to the worker's measure, when given)."""
        if self._done:
            return
        self._done = True
        extra_audio = 0.0 if audio_seconds is None else audio_seconds - self._charge.audio_seconds
        self._limiter.release(self, self.reserved_tokens - used_tokens, extra_audio)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RedisLimiter:
    """Token buckets, concurrency leases and quota windows per subject, in Redis, shared by
    every gateway that uses the same Redis and ``prefix``.

    Args:
        client: The Redis connection (:class:`~lmaas.gateway.resp.RespClient`); the limiter
            owns it.
        prefix: Namespace of the limiter's keys (tests use one per test).
        lease_ttl_s: How long a concurrency slot outlives a gateway that stopped refreshing it.
        quota_source: Where a quota window Redis does not hold yet is loaded from (the usage
            table); without one, such windows start empty.
        wall_clock: Current UTC time: which day and month the quota windows are.
        credit: Admit from local credit when the gateway is busy (see
            :mod:`lmaas.gateway.redis_credit`); False: one script per admission.
    """

    def __init__(
        self,
        client: RespClient,
        *,
        prefix: str = "lmaas:limits",
        lease_ttl_s: float = 15.0,
        quota_source: QuotaSource | None = None,
        wall_clock: Callable[[], datetime] = _utcnow,
        credit: bool = True,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, not {lease_ttl_s}")
        self._client = client
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self._wall_clock = wall_clock
        self._admit = Script(ADMIT_LUA)
        self._settle = Script(SETTLE_LUA)
        self._refresh = Script(REFRESH_LUA)
        gateway = uuid.uuid4().hex[:16]
        self._lease_prefix = f"{gateway}-"
        self._lease_numbers = itertools.count()
        """Lease ids: this limiter's random prefix and a counter (a uuid4 per request cost
        more than the rest of the admission's arguments)."""
        self._live: dict[str, list[str]] = {}
        """lease id → the lease sets it is in, for the refresher."""
        self._refresher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._windows = RedisWindows(client, prefix, quota_source or ZeroSource(), wall_clock)
        self._credit: CreditBook | None = None
        if credit:
            self._credit = CreditBook(
                client,
                gateway,
                credit_ttl_s=min(lease_ttl_s, _MAX_CREDIT_TTL_S),
                lease_ttl_s=lease_ttl_s,
                on_slots=self._ensure_refresher,
            )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "lmaas:limits",
        lease_ttl_s: float = 15.0,
        quota_source: QuotaSource | None = None,
        credit: bool = True,
    ) -> RedisLimiter:
        """A limiter on its own connection pool to ``url`` (``redis://host:port/db``)."""
        client = RespClient.from_url(url, timeout_s=5.0, connect_timeout_s=5.0)
        return cls(
            client,
            prefix=prefix,
            lease_ttl_s=lease_ttl_s,
            quota_source=quota_source,
            credit=credit,
        )

    def _keys(self, subject: Subject) -> tuple[str, str, str]:
        base = f"{self.prefix}:{subject.kind}:{subject.name}"
        return f"{base}:rpm", f"{base}:tpm", f"{base}:leases"

    def window_key(self, subject: Subject, window: Window) -> str:
        """The hash of one subject's quota window: ``<prefix>:<kind>:<name>:quota:<day|month>:
        <id>``."""
        return self._windows.key(subject, window)

    async def admit_async(
        self, subjects: Sequence[Subject], tokens: int, charge: Charge = NO_CHARGE
    ) -> RedisAdmission:
        """Admit one request that may use ``tokens`` (and ``charge``) against every subject's
        limits and quotas, atomically across every gateway: from local credit when it covers
        everything, else by the admission script (told what credit covered). A quota window
        Redis does not hold yet is loaded from the quota source first (then the admission runs
        again).

        Raises:
            RateLimitError: a limit is reached (nothing is taken), with the seconds to wait.
            QuotaExceededError: a quota is used up; ``retry_after_s`` runs to the period's end.
            ServiceUnavailableError: Redis cannot be reached (503: limits fail closed).
        """
        now = self._wall_clock()
        keys = [self._keys(subject) for subject in subjects]
        for _ in range(_SEED_ATTEMPTS):
            windows = self._windows.of(subjects, now)
            window_keys = [spec.key for _, _, spec in windows]
            plan = self._plan(subjects, keys, windows, tokens, charge)
            if plan is not None and plan.complete:
                return RedisAdmission(self, subjects, "", [], tokens, window_keys, charge, plan)
            lease = f"{self._lease_prefix}{next(self._lease_numbers)}"
            ttl_ms = max(1, round(self.lease_ttl_s * 1000))
            command = admit_command(subjects, keys, windows, tokens, charge, lease, ttl_ms, plan)
            reply = await self._admit_in_redis(command, plan)
            if int(reply[0]) == 1:
                held = command.held
                admission = RedisAdmission(
                    self, subjects, lease, held, tokens, window_keys, charge, plan
                )
                if held:
                    self._live[lease] = held
                    self._ensure_refresher()
                return admission
            await self._refused(reply, subjects, windows, command.quotas, tokens, charge, now)
        raise ServiceUnavailableError(
            "the quota windows could not be loaded into Redis; retry later", retry_after_s=1.0
        )

    def _plan(
        self,
        subjects: Sequence[Subject],
        keys: list[tuple[str, str, str]],
        windows: AdmitWindows,
        tokens: int,
        charge: Charge,
    ) -> Plan | None:
        """Take what the admission needs from the credit (None without credit)."""
        credit = self._credit
        if credit is None:
            return None
        now = asyncio.get_running_loop().time()
        whole = charge == NO_CHARGE and credited_quotas(subjects)
        plan = credit.plan(subjects, keys, [spec for _, _, spec in windows], tokens, whole, now)
        if plan.complete:
            credit.admitted(plan, now)
        return plan

    async def _admit_in_redis(self, command: AdmitCommand, plan: Plan | None) -> list[Any]:
        """Run the admission script; a refused or failed admission gives its credit back."""
        credit = self._credit
        try:
            reply: list[Any] = await self._run(self._admit, command.keys, command.args)
        except BaseException:
            if plan is not None and credit is not None:
                credit.restore(plan, asyncio.get_running_loop().time())
            raise
        if plan is not None and credit is not None:
            now = asyncio.get_running_loop().time()
            if int(reply[0]) == 1:
                credit.admitted(plan, now)
            else:
                credit.restore(plan, now)
        return reply

    async def _refused(
        self,
        reply: list[Any],
        subjects: Sequence[Subject],
        windows: AdmitWindows,
        quotas: list[Quota],
        tokens: int,
        charge: Charge,
        now: datetime,
    ) -> None:
        """Raise the refusal of an admission script's ``reply``, or load the windows it found
        missing (then the caller admits again)."""
        _, index, reason, wait_ms, detail = (int(v) for v in reply)
        if reason == _UNSEEDED:
            await self._windows.seed([(subjects[i], window) for i, window, _ in windows])
            return
        if reason == _QUOTA:
            quota = quotas[wait_ms]
            cost = cost_of(quota.metric, tokens, charge)
            raise quota_error(subjects[index].label, quota, detail / 1000, cost, now)
        raise _refusal(subjects[index], _REASONS[reason], wait_ms, detail, tokens)

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.run_script(script, keys, args)
        except RedisError as exc:
            raise unavailable(exc) from None

    def release(self, admission: RedisAdmission, refund_tokens: int, audio: float = 0.0) -> None:
        """Settle an admission in the background (see :class:`RedisAdmission`); what came from
        credit goes back to the credit when it can (no I/O)."""
        self._live.pop(admission._lease, None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (interpreter shutdown): the leases expire by themselves
        plan, credit = admission._plan, self._credit
        if (
            plan is not None
            and credit is not None
            and credit.settle(plan, refund_tokens, loop.time())
        ):
            refund_tokens = 0
        if not admission._held and refund_tokens == 0 and audio == 0:
            return
        subjects = admission._subjects
        keys, args = settle_command(
            subjects,
            [self._keys(subject) for subject in subjects],
            admission._lease,
            admission._held,
            admission._windows,
            refund_tokens,
            audio,
        )
        settle = self._client.run_script_nowait(self._settle, keys, args)
        self._pending.add(settle)
        settle.add_done_callback(self._settled)

    def _settled(self, settle: asyncio.Future[Any]) -> None:
        self._pending.discard(settle)
        if settle.cancelled():
            return
        exc = settle.exception()
        if exc is not None:
            _log.warning("could not settle a rate-limit admission in Redis: %s", exc)

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def refresh_now(self) -> int:
        """Push the end of every live lease of this gateway (the slots it holds as credit
        too) ``lease_ttl_s`` ahead; returns how many leases were refreshed."""
        live = list(self._live.items())
        slots = self._credit.slot_members() if self._credit is not None else []
        if not live and not slots:
            return 0
        keys = [key for _, sets in live for key in sets]
        args: list[Any] = [max(1, round(self.lease_ttl_s * 1000))]
        args += [lease for lease, sets in live for _ in sets]
        first_slot = len(keys) + 1
        keys += [account.key for account, _ in slots]
        args += [member for _, member in slots]
        sent = asyncio.get_running_loop().time()
        gone = await self._client.run_script(self._refresh, keys, args)
        if self._credit is not None and slots:
            self._credit.refreshed(slots, {int(i) - first_slot for i in gone}, sent)
        return len(live) + len(slots)

    def _holds_leases(self) -> bool:
        return bool(self._live) or (self._credit is not None and self._credit.holds_slots())

    async def _refresh_forever(self) -> None:
        while self._holds_leases():
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await self.refresh_now()
            except RedisError as exc:
                _log.warning("could not refresh concurrency leases in Redis: %s", exc)

    async def wait_settled(self) -> None:
        """Wait for the settles :meth:`RedisAdmission.finish` started (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def aclose(self) -> None:
        """Finish pending settles, give the credit back, stop refreshing, close the connection
        pool."""
        await self.wait_settled()
        if self._credit is not None:
            await self._credit.aclose()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self._client.aclose()


def _refusal(
    subject: Subject, reason: str, wait_ms: int, in_flight: int, tokens: int
) -> RateLimitError:
    return rate_limit_error(subject, reason, math.ceil(wait_ms / 1000), in_flight, tokens)
