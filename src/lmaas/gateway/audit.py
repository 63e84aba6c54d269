"""The audit trail: an append-only, hash-chained log of every admin action.

Each row holds who (``actor``: ``lmaas-<key id>`` for the admin API, ``cli:<os user>`` for the
CLI, ``system:bootstrap`` for the first-start key), when, what (``action``, ``target``) and the
record ``before`` and ``after`` (canonical JSON; never a secret nor a key hash). Row ``n`` stores
``hash = sha256(prev_hash + canonical JSON of the row)`` with ``prev_hash`` the hash of row
``n-1`` (64 zeros for the first), and the one-row ``audit_head`` table holds the last ``seq`` and
``hash``: editing a row breaks its hash, deleting one breaks the next row's link (or, for the
last rows, the head), so :func:`verify_chain` names the first row that does not check out.

Appends are serialised so that concurrent writers (two gateways, the CLI and a gateway) never
fork the chain: an append first updates the head row, which takes the write lock (SQLite) or
the head's row lock (PostgreSQL) until the transaction ends, and only then reads the head. The
primary key on ``seq`` and the unique ``prev_hash`` reject a fork even if that were bypassed.
An append runs in the caller's transaction, so an admin change and its audit row are committed
together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, String, Text, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from lmaas.registry.lifecycle_db import AliasMove

GENESIS_HASH = "0" * 64


class _Base(DeclarativeBase):
    """Declarative base of the audit tables (created by migration 0003)."""


class AuditRow(_Base):
    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    before: Mapped[str | None] = mapped_column(Text, nullable=True)
    after: Mapped[str | None] = mapped_column(Text, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(_Base):
    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True, frozen=True)
class AuditEntry:
    """One admin action, before it is appended."""

    actor: str
    action: str
    target: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


def alias_move_entry(move: AliasMove, default_actor: str) -> AuditEntry:
    """The audit entry of a registry alias move: actor ``move.actor`` (``default_actor`` when
    empty), action ``alias.move`` or ``alias.remove``, target ``name@alias``, before/after
    ``{"model", "alias", "version"}`` (null: the alias did not exist / was removed)."""

    def view(version: str | None) -> dict[str, Any] | None:
        if version is None:
            return None
        return {"model": move.name, "alias": move.alias, "version": version}

    return AuditEntry(
        move.actor or default_actor,
        "alias.remove" if move.version is None else "alias.move",
        f"{move.name}@{move.alias}",
        view(move.previous_version),
        view(move.version),
    )


@dataclass(slots=True, frozen=True)
class AuditRecord:
    """One appended row."""

    seq: int
    at: str
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def row_hash(
    prev_hash: str,
    seq: int,
    at: str,
    actor: str,
    action: str,
    target: str,
    before: str | None,
    after: str | None,
) -> str:
    """``sha256(prev_hash + canonical JSON of the row)`` (before/after as stored, JSON text)."""
    body = canonical_json(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "target": target,
            "before": before,
            "after": after,
        }
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _record(row: AuditRow) -> AuditRecord:
    return AuditRecord(
        seq=row.seq,
        at=row.at,
        actor=row.actor,
        action=row.action,
        target=row.target,
        before=None if row.before is None else json.loads(row.before),
        after=None if row.after is None else json.loads(row.after),
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def append_audit(session: Session, entry: AuditEntry, now: datetime | None = None) -> AuditRecord:
    """Append ``entry`` to the chain inside ``session``'s transaction (the caller commits).

    The head row is updated first: that statement takes the lock that serialises appenders
    (SQLite's write lock, PostgreSQL's row lock), so the head read next is the latest.
    """
    session.execute(update(AuditHeadRow).where(AuditHeadRow.id == 1).values(seq=AuditHeadRow.seq))
    head = session.execute(
        select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1)
    ).one()
    seq = int(head.seq) + 1
    at = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    before = None if entry.before is None else canonical_json(entry.before)
    after = None if entry.after is None else canonical_json(entry.after)
    digest = row_hash(head.hash, seq, at, entry.actor, entry.action, entry.target, before, after)
    row = AuditRow(
        seq=seq,
        at=at,
        actor=entry.actor[:128],
        action=entry.action[:64],
        target=entry.target[:128],
        before=before,
        after=after,
        prev_hash=head.hash,
        hash=digest,
    )
    session.add(row)
    session.execute(update(AuditHeadRow).where(AuditHeadRow.id == 1).values(seq=seq, hash=digest))
    session.flush()
    return _record(row)


def list_audit(
    session: Session,
    *,
    limit: int = 100,
    after_seq: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    newest_first: bool = True,
) -> list[AuditRecord]:
    """Rows, newest first by default, filtered by actor, action or target."""
    query = select(AuditRow)
    if after_seq is not None:
        query = query.where(AuditRow.seq > after_seq)
    if actor is not None:
        query = query.where(AuditRow.actor == actor)
    if action is not None:
        query = query.where(AuditRow.action == action)
    if target is not None:
        query = query.where(AuditRow.target == target)
    order = AuditRow.seq.desc() if newest_first else AuditRow.seq
    return [_record(r) for r in session.scalars(query.order_by(order).limit(limit))]


@dataclass(slots=True, frozen=True)
class ChainReport:
    """What :func:`verify_chain` found."""

    ok: bool
    rows: int
    """Rows checked."""
    first_broken_seq: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "first_broken_seq": self.first_broken_seq,
            "reason": self.reason,
        }


def check_rows(rows: Iterable[AuditRow], head_seq: int, head_hash: str) -> ChainReport:
    """Walk rows in ``seq`` order: contiguous numbering, each link and hash, then the head."""
    prev_hash, expected, count = GENESIS_HASH, 1, 0
    for row in rows:
        count += 1
        if row.seq != expected:
            missing = expected if row.seq > expected else row.seq
            return ChainReport(
                False, count, missing, f"row {expected} is missing (next row is {row.seq})"
            )
        if row.prev_hash != prev_hash:
            return ChainReport(
                False, count, row.seq, f"row {row.seq} does not link to row {row.seq - 1}"
            )
        digest = row_hash(
            row.prev_hash, row.seq, row.at, row.actor, row.action, row.target, row.before, row.after
        )
        if digest != row.hash:
            return ChainReport(
                False, count, row.seq, f"row {row.seq} was modified (its hash does not match)"
            )
        prev_hash, expected = row.hash, expected + 1
    if head_seq != expected - 1 or head_hash != prev_hash:
        broken = expected if head_seq >= expected else max(1, head_seq)
        return ChainReport(
            False,
            count,
            broken,
            f"the chain ends at row {expected - 1} but its head says row {head_seq}: "
            "rows were deleted at the end, or the head was altered",
        )
    return ChainReport(True, count)


def verify_chain(session: Session, batch: int = 5000) -> ChainReport:
    """Walk the whole chain (in batches) and report the first broken row, if any."""
    head = session.execute(
        select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.id == 1)
    ).one_or_none()
    if head is None:
        return ChainReport(False, 0, None, "the audit head row is missing")

    def rows() -> Iterable[AuditRow]:
        last = 0
        while True:
            chunk = list(
                session.scalars(
                    select(AuditRow).where(AuditRow.seq > last).order_by(AuditRow.seq).limit(batch)
                )
            )
            if not chunk:
                return
            yield from chunk
            last = chunk[-1].seq

    return check_rows(rows(), int(head.seq), head.hash)
