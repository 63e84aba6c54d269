"""Alembic environment of the registry DB.

lmaas runs migrations in code (:func:`lmaas.registry.metadata.upgrade_schema`), which hands over
an open connection in ``config.attributes["connection"]``; no ``alembic.ini`` is needed.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from lmaas.registry.metadata import Base, normalize_database_url


def _run_with(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=is_sqlite,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over the connection given by the caller, or one opened from ``sqlalchemy.url``."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or pass a connection in config.attributes")
    engine = create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            _run_with(conn)
    finally:
        engine.dispose()


run_migrations_online()
