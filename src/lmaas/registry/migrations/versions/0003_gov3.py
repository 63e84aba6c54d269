"""Fair share: a share weight per tenant (engine queues serve tenants in proportion to it).

Revision ID: 0003_gov3
Revises: 0003_gov2
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_gov3"
down_revision: str | None = "0003_gov2"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``tenants.weight`` (1 for every existing tenant)."""
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("weight")
