"""Deployments: the current deployment of each served name, and the history of its changes.

Revision ID: 0004_deploy
Revises: 0004_quotas
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_deploy"
down_revision: str | None = "0004_quotas"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create deployments and deployment_history."""
    op.create_table(
        "deployments",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False, server_default=""),
    )
    # No foreign key: the history outlives the versions it names.
    op.create_table(
        "deployment_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False, server_default=""),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deployment_history_name", "deployment_history", ["name"])


def downgrade() -> None:
    """Drop the deployment tables."""
    op.drop_index("ix_deployment_history_name", table_name="deployment_history")
    op.drop_table("deployment_history")
    op.drop_table("deployments")
