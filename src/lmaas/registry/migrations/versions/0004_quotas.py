"""Quotas per day or month of keys and tenants (tokens, requests, audio seconds, images).

Revision ID: 0004_quotas
Revises: 0003_life1
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_quotas"
down_revision: str | None = "0003_life1"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``quotas`` (JSON list of ``{"metric", "limit", "period"}``; null: none) to
    ``tenants`` and ``api_keys``. What was used is read from ``usage`` (indexed by tenant/key
    and day since 0003_gov2)."""
    for table in ("tenants", "api_keys"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("quotas", sa.JSON(), nullable=True))


def downgrade() -> None:
    for table in ("api_keys", "tenants"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("quotas")
