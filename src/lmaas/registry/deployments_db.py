"""Deployments in the metadata DB: what each served name routes to now, and every change to it.

The registry stores a deployment as JSON (``lmaas.engine.deploy.DeploymentSpec.to_dict``) and
knows nothing of its meaning: :meth:`DeploymentStore.change` locks the row, hands the current
JSON to a function that computes the next one (which may refuse, e.g. a promotion gate), then
writes it with a bumped ``revision`` and a ``deployment_history`` row in one transaction, in
which an optional hook appends the audit row too. :meth:`DeploymentStore.stop` deletes the row
(its history row keeps the revision, so a later deployment of the name continues the count).
Running gateways poll :meth:`revisions` and apply what changed; a name that left it was stopped.

While a canary runs, each gateway also publishes its per-version outcome windows
(:meth:`DeploymentStore.exchange_windows`, table ``deployment_windows``) and reads everyone's,
so that the canary guard judges the traffic of all gateways together.

Each gateway also publishes what it has applied (:meth:`DeploymentStore.publish_fleet`, table
``deployment_fleet``): one row per served name (the revision it routes, ready replicas per
version, a load failure) and one heartbeat row (name ``*``: which names it follows), so that
``lmaas deploy --wait`` can tell when a change has reached every live gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from lmaas.core.errors import ConflictError
from lmaas.registry.metadata import Base

_MAX_ATTEMPTS = 3

SpecJson = dict[str, Any]


class DeploymentRow(Base):
    """The current deployment of one served name."""

    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[SpecJson] = mapped_column(JSON)
    revision: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(128), default="")


class DeploymentHistoryRow(Base):
    """One change of a deployment (kept after the versions it names are gone)."""

    __tablename__ = "deployment_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(32))
    spec: Mapped[SpecJson] = mapped_column(JSON)
    previous: Mapped[SpecJson | None] = mapped_column(JSON, nullable=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeploymentWindowRow(Base):
    """One gateway's outcome window of one deployed version (while a canary runs)."""

    __tablename__ = "deployment_windows"

    gateway: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    """``WindowCounts.to_dict``: requests, errors, latency buckets."""
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class DeploymentFleetRow(Base):
    """What one gateway has applied of one deployment (or, name ``*``, its heartbeat)."""

    __tablename__ = "deployment_fleet"

    gateway: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


FLEET_GATEWAY_ROW = "*"
"""The name of a gateway's heartbeat row (not a valid model name)."""


@dataclass(slots=True, frozen=True)
class FleetRow:
    """One gateway's published report of one served name (or its heartbeat row)."""

    gateway: str
    name: str
    report: dict[str, Any]
    updated_at: datetime


@dataclass(slots=True, frozen=True)
class VersionWindow:
    """A gateway's window of one version, as stored (``WindowCounts.to_dict`` JSON)."""

    gateway: str
    name: str
    version: str
    counts: dict[str, Any]


WINDOW_ROWS_KEPT_S = 600.0
"""Window rows older than this (of gateways that stopped publishing) are deleted."""


@dataclass(slots=True, frozen=True)
class StoredDeployment:
    """A deployment as stored: its spec JSON and revision (1 for the first)."""

    name: str
    spec: SpecJson
    revision: int
    updated_at: datetime
    updated_by: str

    @property
    def deployed_versions(self) -> set[str]:
        """The versions the deployment routes to (they may not be removed)."""
        return {str(t["version"]) for t in self.spec.get("targets", [])}


@dataclass(slots=True, frozen=True)
class DeploymentChange:
    """One committed change, as the history lists it (and the audit hook receives it).

    Attributes:
        name: The served name.
        revision: The revision this change made.
        action: ``set``, ``canary``, ``promote``, ``rollback``, ``auto-rollback``,
            ``scale``, ``weights``, ``serve``, ``stop``, ``follow`` (an alias the deployment
            follows moved), ``unfollow`` (that alias was removed).
        spec: The deployment after the change (``{}`` after ``stop``).
        previous: The deployment before it (None for the first).
        actor: Who (a key id, ``cli:<user>``, ``system:...``).
        reason: Free text: a gate's numbers, the canary guard's verdict, an operator's note.
        changed_at: When (UTC).
    """

    name: str
    revision: int
    action: str
    spec: SpecJson
    previous: SpecJson | None
    actor: str
    reason: str
    changed_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "action": self.action,
            "spec": self.spec,
            "previous": self.previous,
            "actor": self.actor,
            "reason": self.reason,
            "changed_at": self.changed_at.isoformat(),
        }


Compute = Callable[[SpecJson | None], SpecJson | None]
"""Current spec (None: no deployment yet) → next spec; None means "no change"."""
InTransaction = Callable[[Session, DeploymentChange], None]


class DeploymentStore:
    """Deployments and their history over the registry's sessions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def get(self, name: str) -> StoredDeployment | None:
        with self._sessions() as session:
            row = session.get(DeploymentRow, name)
            return None if row is None else _stored(row)

    def list_all(self) -> list[StoredDeployment]:
        with self._sessions() as session:
            rows = session.scalars(select(DeploymentRow).order_by(DeploymentRow.name)).all()
            return [_stored(r) for r in rows]

    def revisions(self) -> dict[str, int]:
        """Name → revision of every deployment: what a gateway polls (one small query)."""
        with self._sessions() as session:
            rows = session.execute(select(DeploymentRow.name, DeploymentRow.revision)).all()
        return {name: revision for name, revision in rows}

    def stopped(self) -> set[str]:
        """Names that had a deployment and were stopped (history rows, no deployment row)."""
        live = select(DeploymentRow.name)
        query = select(DeploymentHistoryRow.name).where(DeploymentHistoryRow.name.not_in(live))
        with self._sessions() as session:
            return set(session.scalars(query.distinct()).all())

    def exchange_windows(
        self, gateway: str, windows: list[VersionWindow], fresh_s: float
    ) -> list[VersionWindow]:
        """Replace ``gateway``'s published windows with ``windows`` and return every gateway's
        windows of the same names updated in the last ``fresh_s`` seconds (``gateway``'s own
        included), in one transaction. With no ``windows`` it only withdraws the gateway's."""
        now = datetime.now(UTC)
        names = {w.name for w in windows}
        with self._sessions.begin() as session:
            _withdraw(session, DeploymentWindowRow, gateway, now)
            session.add_all(
                DeploymentWindowRow(
                    gateway=gateway, name=w.name, version=w.version, counts=w.counts, updated_at=now
                )
                for w in windows
            )
            if not names:
                return []
            session.flush()
            rows = session.scalars(
                select(DeploymentWindowRow).where(
                    DeploymentWindowRow.name.in_(names),
                    DeploymentWindowRow.updated_at >= now - timedelta(seconds=fresh_s),
                )
            ).all()
            return [VersionWindow(r.gateway, r.name, r.version, dict(r.counts)) for r in rows]

    def publish_fleet(self, gateway: str, reports: dict[str, dict[str, Any]]) -> None:
        """Replace ``gateway``'s fleet rows with ``reports`` (name → report; the heartbeat row
        is named :data:`FLEET_GATEWAY_ROW`), in one transaction; ``{}`` withdraws them. Rows
        of gateways that stopped publishing long ago are deleted on the way."""
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            _withdraw(session, DeploymentFleetRow, gateway, now)
            session.add_all(
                DeploymentFleetRow(gateway=gateway, name=name, report=report, updated_at=now)
                for name, report in reports.items()
            )

    def fleet(self, fresh_s: float) -> list[FleetRow]:
        """Every fleet row published in the last ``fresh_s`` seconds (live gateways')."""
        since = datetime.now(UTC) - timedelta(seconds=fresh_s)
        query = select(DeploymentFleetRow).where(DeploymentFleetRow.updated_at >= since)
        with self._sessions() as session:
            rows = session.scalars(query.order_by(DeploymentFleetRow.gateway)).all()
            return [FleetRow(r.gateway, r.name, dict(r.report), _utc(r.updated_at)) for r in rows]

    def history(self, name: str, limit: int = 1000) -> list[DeploymentChange]:
        """The changes of ``name``, oldest first (the last ``limit``)."""
        query = (
            select(DeploymentHistoryRow)
            .where(DeploymentHistoryRow.name == name)
            .order_by(DeploymentHistoryRow.id.desc())
            .limit(limit)
        )
        with self._sessions() as session:
            rows = list(session.scalars(query).all())
        return [_change(r) for r in reversed(rows)]

    def change(
        self,
        name: str,
        action: str,
        compute: Compute,
        *,
        actor: str,
        reason: str | Callable[[], str] = "",
        in_transaction: InTransaction | None = None,
    ) -> DeploymentChange | None:
        """Replace the deployment of ``name`` with ``compute(current)`` and record the change,
        atomically; None when ``compute`` returned None (nothing to change, nothing recorded).
        ``reason`` may be a callable, read after ``compute`` (which may have found it out).

        Raises:
            Whatever ``compute`` raises (nothing is written), ConflictError when concurrent
            creators kept colliding.
        """
        for attempt in range(_MAX_ATTEMPTS):
            try:
                return self._change_once(name, action, compute, actor, reason, in_transaction)
            except IntegrityError:
                # Another writer created the same deployment between our read and our insert.
                if attempt == _MAX_ATTEMPTS - 1:
                    raise ConflictError(f"deployment {name} is being changed; retry") from None
        raise AssertionError("unreachable")

    def _change_once(
        self,
        name: str,
        action: str,
        compute: Compute,
        actor: str,
        reason_of: str | Callable[[], str],
        in_transaction: InTransaction | None,
    ) -> DeploymentChange | None:
        with self._sessions.begin() as session:
            return self.change_in(
                session, name, action, compute, actor=actor, reason=reason_of,
                in_transaction=in_transaction,
            )  # fmt: skip

    @staticmethod
    def change_in(
        session: Session,
        name: str,
        action: str,
        compute: Compute,
        *,
        actor: str,
        reason: str | Callable[[], str] = "",
        in_transaction: InTransaction | None = None,
    ) -> DeploymentChange | None:
        """:meth:`change` inside a transaction the caller holds (an alias move's, so that a
        deployment following the alias moves with it and both commit or neither)."""
        now = datetime.now(UTC)
        # Write first: it takes SQLite's write lock (PostgreSQL: the row lock) before the
        # read, so concurrent changes serialize and each sees the one before it.
        session.execute(
            update(DeploymentRow)
            .where(DeploymentRow.name == name)
            .values(revision=DeploymentRow.revision)
        )
        row = session.scalars(
            select(DeploymentRow).where(DeploymentRow.name == name).with_for_update()
        ).first()
        previous = None if row is None else dict(row.spec)
        spec = compute(previous)
        if spec is None:
            return None
        text = reason() if callable(reason) else reason
        revision = (_last_revision(session, name) if row is None else row.revision) + 1
        if row is None:
            session.add(
                DeploymentRow(
                    name=name, spec=spec, revision=revision, updated_at=now, updated_by=actor
                )
            )
        else:
            row.spec, row.revision, row.updated_at, row.updated_by = spec, revision, now, actor
        change = DeploymentChange(name, revision, action, spec, previous, actor, text, now)
        _record(session, change, in_transaction)
        return change

    def stop(
        self,
        name: str,
        *,
        actor: str,
        reason: str = "",
        in_transaction: InTransaction | None = None,
    ) -> DeploymentChange | None:
        """Delete the deployment of ``name`` (gateways drain and stop its replicas) and record
        a ``stop`` change; None when ``name`` has no deployment."""
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            session.execute(  # the write lock first, as in change()
                update(DeploymentRow)
                .where(DeploymentRow.name == name)
                .values(revision=DeploymentRow.revision)
            )
            row = session.scalars(
                select(DeploymentRow).where(DeploymentRow.name == name).with_for_update()
            ).first()
            if row is None:
                return None
            previous, revision = dict(row.spec), row.revision + 1
            session.execute(delete(DeploymentRow).where(DeploymentRow.name == name))
            change = DeploymentChange(name, revision, "stop", {}, previous, actor, reason, now)
            _record(session, change, in_transaction)
        return change


def _record(
    session: Session, change: DeploymentChange, in_transaction: InTransaction | None
) -> None:
    session.add(
        DeploymentHistoryRow(
            name=change.name,
            revision=change.revision,
            action=change.action,
            spec=change.spec,
            previous=change.previous,
            actor=change.actor[:128],
            reason=change.reason,
            changed_at=change.changed_at,
        )
    )
    session.flush()
    if in_transaction is not None:
        in_transaction(session, change)


def _last_revision(session: Session, name: str) -> int:
    """The revision of the last change of ``name`` (0 for none): a deployment made after a
    ``stop`` continues the count, so gateways never mistake it for an old one."""
    query = select(func.max(DeploymentHistoryRow.revision)).where(DeploymentHistoryRow.name == name)
    return int(session.scalar(query) or 0)


def _stored(row: DeploymentRow) -> StoredDeployment:
    return StoredDeployment(
        row.name, dict(row.spec), row.revision, _utc(row.updated_at), row.updated_by
    )


def _change(row: DeploymentHistoryRow) -> DeploymentChange:
    return DeploymentChange(
        row.name,
        row.revision,
        row.action,
        dict(row.spec),
        None if row.previous is None else dict(row.previous),
        row.actor,
        row.reason,
        _utc(row.changed_at),
    )


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _withdraw(
    session: Session,
    table: type[DeploymentWindowRow] | type[DeploymentFleetRow],
    gateway: str,
    now: datetime,
) -> None:
    """Delete ``gateway``'s published rows of ``table``, and every gateway's rows older than
    :data:`WINDOW_ROWS_KEPT_S` (gateways that stopped without withdrawing)."""
    stale = now - timedelta(seconds=WINDOW_ROWS_KEPT_S)
    session.execute(delete(table).where((table.gateway == gateway) | (table.updated_at < stale)))
