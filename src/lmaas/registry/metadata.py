"""Metadata DB of the registry: one row per model, one per version (SQLAlchemy 2, Alembic).

SQLite (WAL, busy timeout, ``synchronous=FULL``) by default; PostgreSQL through a
``postgresql://`` URL, driven by psycopg 3. The schema is created and upgraded by the Alembic
migrations shipped in ``lmaas/registry/migrations``; upgrading a current DB is a no-op.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from lmaas.core.errors import ConflictError, InternalError
from lmaas.registry.manifest import Manifest

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for another one before failing with ``database is locked``."""

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class VersionState(enum.StrEnum):
    """Registry state of a version (not the readiness of a replica)."""

    AVAILABLE = "available"
    ARCHIVED = "archived"


class Base(DeclarativeBase):
    """Declarative base of the registry tables."""


class ModelRow(Base):
    """A model name; its versions hang off it."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelVersionRow(Base):
    """One immutable version, with a JSON copy of its manifest."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(
        String(64), ForeignKey("models.name", ondelete="CASCADE"), index=True
    )
    version: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=VersionState.AVAILABLE.value)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def normalize_database_url(url: str) -> str:
    """Pick the psycopg 3 driver for bare ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _set_sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def create_db_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite files get WAL, a busy timeout and full sync.

    Args:
        url: SQLAlchemy URL (``sqlite:///path`` or ``postgresql://...``).
    """
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _set_sqlite_pragmas)
    return engine


def head_revision() -> str:
    """The newest revision of the shipped migrations (what :func:`upgrade_schema` reaches)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Run the shipped Alembic migrations up to ``revision`` (a no-op when already there)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def open_migrated_engine(url: str) -> Engine:
    """An engine for ``url`` with the schema migrated to the latest revision (every store that
    opens the metadata DB starts here).

    Raises:
        InternalError: The DB cannot be opened or migrated.
    """
    engine = create_db_engine(url)
    try:
        upgrade_schema(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise InternalError(f"cannot open the metadata DB: {exc}") from exc
    return engine


def _sort_key(manifest: Manifest) -> tuple[str, int, str]:
    version = manifest.version
    return (manifest.name, int(version) if version.isdigit() else 1 << 62, version)


class MetadataStore:
    """Model and version rows in the metadata DB.

    Args:
        url: SQLAlchemy URL; the schema is migrated to the latest revision on open.

    Raises:
        InternalError: The DB cannot be opened or migrated.
    """

    def __init__(self, url: str) -> None:
        self._engine = open_migrated_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory, shared with :class:`~lmaas.registry.lifecycle_db.LifecycleStore`."""
        return self._sessions

    def add_version(self, manifest: Manifest) -> None:
        """Record a version whose files are already in place.

        Raises:
            ConflictError: The version is already recorded.
        """
        now = datetime.now(UTC)
        try:
            with self._sessions.begin() as session:
                if session.get(ModelRow, manifest.name) is None:
                    session.add(ModelRow(name=manifest.name, created_at=now))
                    session.flush()
                session.add(_version_row(manifest))
        except IntegrityError as exc:
            raise ConflictError(f"model version {manifest.ref} already exists") from exc

    def list_versions(self, name: str | None = None) -> list[Manifest]:
        """Return every version (of ``name`` when given), sorted by name then numeric version."""
        query = select(ModelVersionRow.manifest)
        if name is not None:
            query = query.where(ModelVersionRow.name == name)
        with self._sessions() as session:
            manifests = [Manifest.from_dict(data) for data in session.scalars(query)]
        return sorted(manifests, key=_sort_key)

    def get_version(self, name: str, version: str) -> Manifest | None:
        """Return one version, or None when it is not recorded."""
        query = select(ModelVersionRow.manifest).where(
            ModelVersionRow.name == name, ModelVersionRow.version == version
        )
        with self._sessions() as session:
            data = session.scalars(query).first()
        return None if data is None else Manifest.from_dict(data)

    def delete_version(self, name: str, version: str) -> bool:
        """Delete one version (and the model row after its last version); True if it existed."""
        with self._sessions.begin() as session:
            result = session.execute(
                delete(ModelVersionRow).where(
                    ModelVersionRow.name == name, ModelVersionRow.version == version
                )
            )
            left = session.scalars(
                select(ModelVersionRow.id).where(ModelVersionRow.name == name).limit(1)
            ).first()
            if left is None:
                session.execute(delete(ModelRow).where(ModelRow.name == name))
        return bool(getattr(result, "rowcount", 0))

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()


def _version_row(manifest: Manifest) -> ModelVersionRow:
    return ModelVersionRow(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task.value,
        format=manifest.format.value,
        state=VersionState.AVAILABLE.value,
        manifest=manifest.model_dump(mode="json"),
        size_bytes=manifest.size_bytes,
        created_at=manifest.created_at,
    )
