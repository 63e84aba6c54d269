"""Aliases, alias history, tags and evaluation metrics of versions, in the metadata DB.

The manifest on disk is immutable, so everything that changes after import lives here: which
version an alias names (moved in one transaction together with its history row and, through
an optional hook, its audit row), free-form tags, and evaluation results keyed by version,
metric, dataset digest and split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from lmaas.core.errors import ConflictError, ModelNotFoundError
from lmaas.registry.metadata import Base, ModelVersionRow

_MAX_MOVE_ATTEMPTS = 3


class AliasRow(Base):
    """``name@alias`` → version."""

    __tablename__ = "model_aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "version"],
            ["model_versions.name", "model_versions.version"],
            name="fk_model_aliases_version",
        ),
    )

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasHistoryRow(Base):
    """One alias move; ``version`` None means the alias was removed."""

    __tablename__ = "alias_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    moved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(128), default="")


class TagRow(Base):
    """A ``key=value`` tag of one version (a label is a tag with an empty value)."""

    __tablename__ = "version_tags"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), default="")


class MetricRow(Base):
    """One evaluation result of one version."""

    __tablename__ = "version_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    dataset_digest: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(256), default="")
    split: Mapped[str] = mapped_column(String(64), default="")
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    measured_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(slots=True, frozen=True)
class AliasMove:
    """One change of an alias, as recorded in the history (and handed to the audit hook).

    Attributes:
        name: The model.
        alias: The alias that moved.
        version: The version it names now; None when it was removed.
        previous_version: The version it named before; None when it is new.
        moved_at: When (UTC).
        actor: Who moved it (a key id, ``cli``...), empty when unknown.
    """

    name: str
    alias: str
    version: str | None
    previous_version: str | None
    moved_at: datetime
    actor: str = ""


AliasInTransaction = Callable[[Session, AliasMove], None]
"""Called inside an alias move's transaction, after its history row: the audit trail appends
its row there, so that the move and its audit row commit together or not at all."""


@dataclass(slots=True, frozen=True)
class StoredMetric:
    """One evaluation result as ``lmaas models show`` and ``compare`` print it."""

    metric: str
    value: float
    dataset_digest: str
    dataset: str
    split: str
    num_examples: int
    measured_at: datetime


class LifecycleStore:
    """Aliases, history, tags and metrics over the registry's sessions.

    Args:
        sessions: The metadata DB's session factory (the same DB as the versions).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    # ------------------------------------------------------------------ aliases

    def move_alias(
        self,
        name: str,
        alias: str,
        version: str | None,
        actor: str,
        in_transaction: AliasInTransaction | None = None,
    ) -> AliasMove:
        """Point ``name@alias`` at ``version`` (None removes it) and record the move, atomically
        (with whatever ``in_transaction`` writes in the same transaction).

        Raises:
            ModelNotFoundError: The version does not exist, or (removal) the alias does not.
            Whatever ``in_transaction`` raises (nothing is written).
        """
        for attempt in range(_MAX_MOVE_ATTEMPTS):
            try:
                return self._move_once(name, alias, version, actor, in_transaction)
            except IntegrityError:
                # Another gateway created the same alias between our read and our insert.
                if attempt == _MAX_MOVE_ATTEMPTS - 1:
                    raise ConflictError(f"alias {name}@{alias} is being moved; retry") from None
        raise AssertionError("unreachable")

    def _move_once(
        self,
        name: str,
        alias: str,
        version: str | None,
        actor: str,
        in_transaction: AliasInTransaction | None,
    ) -> AliasMove:
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            # Write first: it takes SQLite's write lock (PostgreSQL: the row lock) before the
            # read of the previous version, so concurrent movers serialize and no move is lost.
            session.execute(
                update(AliasRow)
                .where(AliasRow.name == name, AliasRow.alias == alias)
                .values(updated_at=now)
            )
            if version is not None and _version_id(session, name, version) is None:
                raise ModelNotFoundError(
                    f"model version {name}:{version} does not exist", param="version"
                )
            # FOR UPDATE (PostgreSQL): when the alias did not exist at the UPDATE above but a
            # concurrent mover has created it since, this read locks the new row too, so the
            # previous version it returns cannot be overwritten before our commit.
            row = session.scalars(
                select(AliasRow)
                .where(AliasRow.name == name, AliasRow.alias == alias)
                .with_for_update()
            ).first()
            previous = None if row is None else row.version
            if version is None:
                if row is None:
                    raise ModelNotFoundError(f"alias {name}@{alias} does not exist", param="alias")
                session.delete(row)
            elif row is None:
                session.add(AliasRow(name=name, alias=alias, version=version, updated_at=now))
            else:
                row.version, row.updated_at = version, now
            move = AliasMove(name, alias, version, previous, now, actor)
            session.add(
                AliasHistoryRow(
                    name=name,
                    alias=alias,
                    version=version,
                    previous_version=previous,
                    moved_at=now,
                    actor=actor,
                )
            )
            session.flush()
            if in_transaction is not None:
                # After the alias row's lock: every mover takes the audit head's lock last, as
                # the other admin changes do, so the locks are always taken in the same order.
                in_transaction(session, move)
        return move

    def alias_target(self, name: str, alias: str) -> str | None:
        """The version ``name@alias`` names, or None."""
        with self._sessions() as session:
            return session.scalars(
                select(AliasRow.version).where(AliasRow.name == name, AliasRow.alias == alias)
            ).first()

    def aliases(self, name: str) -> dict[str, str]:
        """Every alias of ``name`` → its version, sorted by alias."""
        with self._sessions() as session:
            rows = session.execute(
                select(AliasRow.alias, AliasRow.version)
                .where(AliasRow.name == name)
                .order_by(AliasRow.alias)
            ).all()
        return {alias: version for alias, version in rows}

    def history(self, name: str) -> list[AliasMove]:
        """Every alias move of ``name``, oldest first."""
        query = (
            select(AliasHistoryRow).where(AliasHistoryRow.name == name).order_by(AliasHistoryRow.id)
        )
        with self._sessions() as session:
            rows = session.scalars(query).all()
            return [
                AliasMove(r.name, r.alias, r.version, r.previous_version, _utc(r.moved_at), r.actor)
                for r in rows
            ]

    # ------------------------------------------------------------------ tags

    def set_tags(self, name: str, version: str, tags: dict[str, str], remove: list[str]) -> None:
        """Add or replace ``tags`` and delete the keys in ``remove`` of one version."""
        with self._sessions.begin() as session:
            version_id = _require_version(session, name, version)
            if remove:
                session.execute(
                    delete(TagRow).where(TagRow.version_id == version_id, TagRow.key.in_(remove))
                )
            for key, value in tags.items():
                row = session.get(TagRow, (version_id, key))
                if row is None:
                    session.add(TagRow(version_id=version_id, key=key, value=value))
                else:
                    row.value = value

    def tags(self, name: str, version: str) -> dict[str, str]:
        """The tags of one version, sorted by key."""
        query = (
            select(TagRow.key, TagRow.value)
            .join(ModelVersionRow, ModelVersionRow.id == TagRow.version_id)
            .where(ModelVersionRow.name == name, ModelVersionRow.version == version)
            .order_by(TagRow.key)
        )
        with self._sessions() as session:
            return {key: value for key, value in session.execute(query).all()}

    # ------------------------------------------------------------------ metrics

    def add_metrics(self, name: str, version: str, metrics: list[StoredMetric]) -> None:
        """Store evaluation results of one version (one transaction)."""
        with self._sessions.begin() as session:
            version_id = _require_version(session, name, version)
            for m in metrics:
                session.add(
                    MetricRow(
                        version_id=version_id,
                        metric=m.metric,
                        value=m.value,
                        dataset_digest=m.dataset_digest,
                        dataset=m.dataset[:256],
                        split=m.split,
                        num_examples=m.num_examples,
                        measured_at=m.measured_at,
                    )
                )

    def metrics(self, name: str, version: str) -> list[StoredMetric]:
        """Every stored result of one version, oldest first."""
        query = (
            select(MetricRow)
            .join(ModelVersionRow, ModelVersionRow.id == MetricRow.version_id)
            .where(ModelVersionRow.name == name, ModelVersionRow.version == version)
            .order_by(MetricRow.id)
        )
        with self._sessions() as session:
            return [
                StoredMetric(
                    r.metric,
                    r.value,
                    r.dataset_digest,
                    r.dataset,
                    r.split,
                    r.num_examples,
                    _utc(r.measured_at),
                )
                for r in session.scalars(query).all()
            ]


def _version_id(session: Session, name: str, version: str) -> int | None:
    return session.scalars(
        select(ModelVersionRow.id).where(
            ModelVersionRow.name == name, ModelVersionRow.version == version
        )
    ).first()


def _require_version(session: Session, name: str, version: str) -> int:
    version_id = _version_id(session, name, version)
    if version_id is None:
        raise ModelNotFoundError(f"model version {name}:{version} does not exist", param="model")
    return version_id


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
