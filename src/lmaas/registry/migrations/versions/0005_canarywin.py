"""Deployment windows: each gateway's outcome window per deployed version while a canary runs,
so that the canary guard judges the traffic of every gateway together.

Revision ID: 0005_canarywin
Revises: 0004_deploy
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_canarywin"
down_revision: str | None = "0004_deploy"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create deployment_windows."""
    op.create_table(
        "deployment_windows",
        sa.Column("gateway", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deployment_windows_updated_at", "deployment_windows", ["updated_at"])


def downgrade() -> None:
    """Drop deployment_windows."""
    op.drop_index("ix_deployment_windows_updated_at", table_name="deployment_windows")
    op.drop_table("deployment_windows")
