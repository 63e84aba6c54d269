"""The gateway's book of local credit for the Redis limiter: what it holds in each limit,
how admissions take from it, and the background scripts that take, renew and give it back.

The design, and why the limits stay exact across gateways: :mod:`lmaas.gateway.redis_credit`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from lmaas.gateway.limits import Subject
from lmaas.gateway.redis_credit import (
    BUCKET,
    IDLE_S,
    RETRY_S,
    SLOTS,
    TRUST,
    WINDOW,
    Account,
    Plan,
    WindowSpec,
    limit_arg,
)
from lmaas.gateway.redis_scripts import CREDIT_LUA
from lmaas.gateway.resp import RedisError, RespClient, Script

_log = logging.getLogger(__name__)


class CreditBook:
    """This gateway's credit in every limit it admits against (see the module docstring).

    Args:
        client: The limiter's Redis connection.
        gateway: This gateway's id in Redis (unique per limiter).
        credit_ttl_s: How long bucket credit lives in Redis without being renewed.
        lease_ttl_s: How long a slot lives without a refresh (the limiter's leases).
        on_slots: Called when slots were granted (the limiter starts its lease refresher).
    """

    def __init__(
        self,
        client: RespClient,
        gateway: str,
        *,
        credit_ttl_s: float,
        lease_ttl_s: float,
        on_slots: Callable[[], None],
    ) -> None:
        self._client = client
        self._on_slots = on_slots
        self._gateway = gateway
        self._member_prefix = f"{gateway}-c"
        self._credit_ttl_s = credit_ttl_s
        self._lease_ttl_s = lease_ttl_s
        self._tick_s = min(0.25, credit_ttl_s / 5)
        self._script = Script(CREDIT_LUA)
        self._accounts: dict[tuple[str, str], Account] = {}
        self._retired_slots: set[Account] = set()
        """Slot accounts of a changed limit whose slots still run requests (refreshed)."""
        self._pending: dict[Account, int] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._numbers = 0
        self._warned_at = -math.inf

    # ------------------------------------------------------------ admission

    def plan(
        self,
        subjects: Sequence[Subject],
        keys: Sequence[tuple[str, str, str]],
        windows: Sequence[WindowSpec],
        tokens: int,
        whole_windows: bool,
        now: float,
    ) -> Plan:
        """Take from the credit what the admission needs (see the module docstring); the plan
        says what was covered. ``whole_windows``: the windows need nothing but tokens and
        requests (else Redis must see the admission)."""
        count = len(subjects)
        plan = Plan([False] * count, [0] * count, [None] * count)
        for index, subject in enumerate(subjects):
            self._plan_subject(plan, index, subject, keys[index], tokens, now)
        for spec in windows:
            used = self._account(WINDOW, spec.key, spec.tokens_limit, "tokens")
            got = self._use(plan, used, tokens, now, tokens_limit=True)
            counted = self._account(WINDOW, spec.key, spec.requests_limit, "requests")
            one = self._use(plan, counted, 1, now, tokens_limit=False)
            plan.windows.append((got, one))
            plan.complete &= one == 1
        plan.creditable = whole_windows or not windows
        plan.complete &= plan.tokens_local and plan.creditable
        return plan

    def _plan_subject(
        self,
        plan: Plan,
        index: int,
        subject: Subject,
        keys: tuple[str, str, str],
        tokens: int,
        now: float,
    ) -> None:
        rpm_key, tpm_key, leases_key = keys
        limits = subject.limits
        if limits.rpm is not None:
            rpm = self._account(BUCKET, rpm_key, limits.rpm, "")
            plan.rpm[index] = self._use(plan, rpm, 1, now, tokens_limit=False) == 1
            plan.complete &= plan.rpm[index]
        if limits.tpm is not None:
            tpm = self._account(BUCKET, tpm_key, limits.tpm, "")
            plan.tpm[index] = self._use(plan, tpm, tokens, now, tokens_limit=True)
        if limits.max_concurrent is not None:
            slots = self._account(SLOTS, leases_key, limits.max_concurrent, "")
            slots.note(1, now)
            plan.needs.append((slots, 1))
            member = plan.slots[index] = slots.take_slot(now)
            if member is None:
                plan.complete = False
            else:
                plan.held.append((slots, member))

    @staticmethod
    def _use(plan: Plan, account: Account, need: int, now: float, *, tokens_limit: bool) -> int:
        """Take ``need`` from ``account``: tokens as much as there is (Redis covers the rest),
        a request wholly or not at all."""
        account.note(need, now)
        plan.needs.append((account, need))
        got = account.take(need, now, partial=tokens_limit)
        plan.taken.append((account, got))
        if tokens_limit:
            plan.token_accounts.append(account)
            plan.tokens_local &= got == need
        return got

    def _account(self, kind: int, key: str, limit: float, metric: str) -> Account:
        account = self._accounts.get((key, metric))
        if account is None or account.limit != limit:
            if account is not None:
                self._retire(account)
            account = self._accounts[(key, metric)] = Account(kind, key, limit, metric)
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.get_running_loop().create_task(self._keep())
        return account

    def restore(self, plan: Plan, now: float) -> None:
        """Give a refused (or failed) admission's credit back to the credit."""
        for account, units in plan.taken:
            account.restore(units, now)
        for account, member in plan.held:
            self._drop_slot(account.put_slot(member, now), account)

    def admitted(self, plan: Plan, now: float) -> None:
        """After an admission: refill, in the background, the credit running low, when every
        limit of the admission can be credited."""
        if not plan.creditable:
            return
        for account, need in plan.needs:
            held = account.held(now)
            if held < need or held < account.low:
                break
        else:
            return  # the usual case: enough credit everywhere
        chunks = [(account, need, account.chunk(need)) for account, need in plan.needs]
        if any(chunk == 0 for _, need, chunk in chunks if need > 0):
            return
        for account, need, chunk in chunks:
            if account.refilling or account.retired or now < account.retry_at or chunk == 0:
                continue
            held = account.held(now)
            if held * 2 < chunk or held < need:
                self._pending[account] = need
        if self._pending and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def settle(self, plan: Plan, refund: int, now: float) -> bool:
        """An admission from credit ends: its slots go back to the credit; tokens it reserved
        and did not use ride to Redis with the account's next script; tokens it used beyond its
        reservation come from the credit. Returns False when Redis must settle the tokens."""
        for account, member in plan.held:
            self._drop_slot(account.put_slot(member, now), account)
        if refund == 0:
            return True
        accounts = plan.token_accounts
        if not plan.tokens_local or any(account.retired for account in accounts):
            return False
        if refund > 0:
            for account in accounts:
                account.refund += refund
            return True
        if any(account.held(now) < -refund for account in accounts):
            return False
        for account in accounts:
            account.credit += refund
        return True

    # ------------------------------------------------------------ Redis

    def _flush(self, renew: Sequence[Account] = ()) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        for account in renew:
            pending.setdefault(account, 0)
        now = asyncio.get_running_loop().time()
        batch: list[tuple[Account, int]] = []
        keys: list[str] = []
        args: list[Any] = [self._gateway, self._ms(self._credit_ttl_s), self._ms(self._lease_ttl_s)]
        for account, need in pending.items():
            have = account.held(now)
            chunk = account.chunk(need) if need else 0
            want = max(0, chunk - have)
            if account.refilling or account.retired or (need and want == 0):
                continue
            claim = have
            if account.kind == SLOTS:
                claim, self._numbers = self._numbers, self._numbers + want
            refund, account.refund = account.refund, 0
            account.refilling = True
            account.low = max(account.low, chunk // 2) if need else account.low
            batch.append((account, claim))
            keys.append(account.key)
            extra = self._member_prefix if account.kind == SLOTS else account.metric
            args += [account.kind, limit_arg(account.limit), claim, want, refund, extra]
        if batch:
            self._start(self._take(batch, keys, args, now))

    async def _take(
        self, batch: list[tuple[Account, int]], keys: list[str], args: list[Any], sent: float
    ) -> None:
        try:
            reply = await self._client.run_script(self._script, keys, args)
        except RedisError as exc:
            for account, _ in batch:
                account.refilling = False
                account.retry_at = sent + RETRY_S
            self._warn("take credit", exc)
            return
        for index, (account, claim) in enumerate(batch):
            account.refilling = False
            trust = (self._lease_ttl_s if account.kind == SLOTS else self._credit_ttl_s) * TRUST
            granted, kept = int(reply[2 * index]), int(reply[2 * index + 1])
            account.granted(granted, kept, claim, sent + trust, self._member_prefix)
            if account.retired:
                self._start(self._give_back([account]))
        if any(account.kind == SLOTS for account, _ in batch):
            self._on_slots()

    async def _give_back(self, accounts: Sequence[Account]) -> None:
        """Give the credit of ``accounts`` back to Redis (units and free slots)."""
        now = asyncio.get_running_loop().time()
        keys: list[str] = []
        args: list[Any] = [self._gateway, self._ms(self._credit_ttl_s), self._ms(self._lease_ttl_s)]
        removals: list[Coroutine[Any, Any, Any]] = []
        for account in accounts:
            if account.kind == SLOTS:
                members = list(account.free)
                account.free.clear()
                if members:
                    removals.append(self._client.execute("ZREM", account.key, *members))
                continue
            claim, refund = account.held(now), account.refund
            account.credit = account.refund = 0
            if claim or refund:
                keys.append(account.key)
                kind, limit = account.kind, limit_arg(account.limit)
                args += [kind, limit, claim, -1, refund, account.metric]
        if keys:
            removals.append(self._client.run_script(self._script, keys, args))
        results = await asyncio.gather(*removals, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self._warn("give credit back", result)

    def _drop_slot(self, member: str | None, account: Account) -> None:
        if member is not None:
            self._start(self._client.execute("ZREM", account.key, member))

    def _retire(self, account: Account) -> None:
        account.retired = True
        if account.busy:
            self._retired_slots.add(account)
        if not account.refilling:
            self._start(self._give_back([account]))

    async def _keep(self) -> None:
        """Every tick: give back idle credit, renew bucket credit in use, forget idle accounts."""
        loop = asyncio.get_running_loop()
        renew_s = self._credit_ttl_s * TRUST / 2
        while self._accounts:
            await asyncio.sleep(self._tick_s)
            now = loop.time()
            idle: list[Account] = []
            renew: list[Account] = []
            for slot, account in list(self._accounts.items()):
                if account.refilling:
                    continue
                if account.kind == SLOTS:
                    account.purge(now)
                holds = account.held(now) > 0 or account.refund > 0
                if now - account.seen >= IDLE_S:
                    if holds:
                        idle.append(account)
                    elif not account.busy:
                        del self._accounts[slot]
                elif holds and account.kind == BUCKET and account.deadline - now < renew_s:
                    renew.append(account)
            if idle:
                self._start(self._give_back(idle))
            if renew:
                self._flush(renew)

    def slot_members(self) -> list[tuple[Account, str]]:
        """Every slot this gateway holds as credit, free or running a request (to refresh)."""
        members: list[tuple[Account, str]] = []
        self._retired_slots = {a for a in self._retired_slots if a.busy}
        for account in [*self._accounts.values(), *self._retired_slots]:
            if account.kind == SLOTS:
                members += [(account, m) for m in account.free]
                members += [(account, m) for m in account.busy]
        return members

    def holds_slots(self) -> bool:
        """Whether any slot is held as credit (the refresher keeps running while one is)."""
        return bool(self.slot_members())

    def refreshed(
        self, members: Sequence[tuple[Account, str]], gone: set[int], sent: float
    ) -> None:
        """Apply a lease refresh sent at ``sent``: ``gone`` are the indexes of ``members``
        Redis no longer holds."""
        until = sent + self._lease_ttl_s * TRUST
        for index, (account, member) in enumerate(members):
            for held in (account.free, account.busy):
                if member in held:
                    if index in gone:
                        del held[member]
                    else:
                        held[member] = max(held[member], until)

    async def aclose(self) -> None:
        """Give every credit back to Redis (free slots included; running requests' slots end
        with their leases)."""
        if self._keeper is not None:
            self._keeper.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        accounts = list(self._accounts.values())
        self._accounts.clear()
        await self._give_back(accounts)

    def _start(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._warn("reach Redis", exc)

    def _warn(self, what: str, exc: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= 10.0:  # one line per 10 s while Redis is away
            self._warned_at = now
            _log.warning("rate-limit credit: could not %s in Redis: %s", what, exc)

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))
