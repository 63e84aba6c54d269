"""Deployment fleet: what each running gateway has applied of each deployment (revision, ready
replicas per version, a load failure), with a heartbeat, so that ``lmaas deploy --wait`` and
``GET /admin/deployments/{name}`` can tell when a change has reached every server.

Revision ID: 0006_fleet
Revises: 0005_canarywin
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_fleet"
down_revision: str | None = "0005_canarywin"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create deployment_fleet."""
    op.create_table(
        "deployment_fleet",
        sa.Column("gateway", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deployment_fleet_updated_at", "deployment_fleet", ["updated_at"])


def downgrade() -> None:
    """Drop deployment_fleet."""
    op.drop_index("ix_deployment_fleet_updated_at", table_name="deployment_fleet")
    op.drop_table("deployment_fleet")
