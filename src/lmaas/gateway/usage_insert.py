"""Usage rows written as a few multi-row INSERT statements instead of one execution per row.

The usage writer runs in a thread beside the gateway's event loop. Executed row by row (what a
DBAPI ``executemany`` does for SQLite), each row releases and takes back the GIL around its
``sqlite3_step``, and every such hand-over while the loop is busy is a pair of thread switches:
on the 2-core development machines that cost the gateway ~0.1 ms of CPU per metered request,
five times what the rows cost to write (``docs/benchmarks.md``, governance overhead). One
statement per :data:`PARAMS_PER_STATEMENT` parameters takes the GIL hand-overs from one per row
to one per statement. SQLite and PostgreSQL (``ON CONFLICT (...) DO NOTHING`` in both); other
dialects are not :attr:`MultiRowInsert.supported` and keep SQLAlchemy's ``executemany``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect

PARAMS_PER_STATEMENT = 900
"""Bound parameters per statement: under SQLite's historical limit of 999 (32,766 since 3.32;
PostgreSQL allows 65,535), so any build of SQLite takes it."""

_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
_DIALECTS = frozenset({"sqlite", "postgresql"})


class MultiRowInsert:
    """``INSERT INTO table (...) VALUES (...), (...) ON CONFLICT (key) DO NOTHING`` in chunks.

    Values go through each column type's own bind processor for the dialect (SQLite's
    ``DateTime`` becomes the text SQLAlchemy itself writes), so rows read back as if SQLAlchemy
    had inserted them.

    Args:
        table: The table; every row gives a value for each of its columns.
        dialect: The engine's dialect.
        conflict_key: The unique column whose duplicates are skipped.
    """

    def __init__(self, table: Table, dialect: Dialect, conflict_key: str) -> None:
        self._names = [column.name for column in table.columns]
        self._columns: list[tuple[str, Callable[[Any], Any] | None]] = [
            (column.name, column.type.dialect_impl(dialect).bind_processor(dialect))
            for column in table.columns
        ]
        """Each column's name and bind processor (None: the driver takes the value as is)."""
        placeholder = _PLACEHOLDERS.get(str(dialect.paramstyle))
        self.supported = dialect.name in _DIALECTS and placeholder is not None
        self._row_sql = "(" + ", ".join([placeholder or "?"] * len(self._names)) + ")"
        self._head = f"INSERT INTO {table.name} ({', '.join(self._names)}) VALUES "
        self._tail = f" ON CONFLICT ({conflict_key}) DO NOTHING"
        self.rows_per_statement = max(1, PARAMS_PER_STATEMENT // len(self._names))
        self._sql: dict[int, str] = {}

    def statement(self, num_rows: int) -> str:
        """The SQL text for ``num_rows`` rows (cached per count)."""
        sql = self._sql.get(num_rows)
        if sql is None:
            sql = self._head + ", ".join([self._row_sql] * num_rows) + self._tail
            self._sql[num_rows] = sql
        return sql

    def parameters(self, rows: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
        """The flat parameter tuple of ``rows``, in column order, through the bind processors."""
        flat: list[Any] = []
        for row in rows:
            for name, process in self._columns:
                value = row[name]
                flat.append(value if process is None or value is None else process(value))
        return tuple(flat)

    def execute(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows`` in the caller's transaction, one statement per chunk."""
        step = self.rows_per_statement
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            connection.exec_driver_sql(self.statement(len(chunk)), self.parameters(chunk))
