"""Lifecycle: aliases, alias history, tags and evaluation metrics of model versions.

Revision ID: 0003_life1
Revises: 0003_gov3
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_life1"
down_revision: str | None = "0003_gov3"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create model_aliases, alias_history, version_tags and version_metrics."""
    op.create_table(
        "model_aliases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["name", "version"],
            ["model_versions.name", "model_versions.version"],
            name="fk_model_aliases_version",
        ),
    )
    # No foreign key: the history outlives the versions and aliases it names.
    op.create_table(
        "alias_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False, server_default=""),
    )
    op.create_index("ix_alias_history_name", "alias_history", ["name"])
    op.create_table(
        "version_tags",
        sa.Column(
            "version_id",
            sa.Integer(),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False, server_default=""),
    )
    op.create_table(
        "version_metrics",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "version_id",
            sa.Integer(),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("dataset_digest", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(256), nullable=False, server_default=""),
        sa.Column("split", sa.String(64), nullable=False, server_default=""),
        sa.Column("num_examples", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_version_metrics_version_id", "version_metrics", ["version_id"])


def downgrade() -> None:
    """Drop the lifecycle tables."""
    op.drop_index("ix_version_metrics_version_id", table_name="version_metrics")
    op.drop_table("version_metrics")
    op.drop_table("version_tags")
    op.drop_index("ix_alias_history_name", table_name="alias_history")
    op.drop_table("alias_history")
    op.drop_table("model_aliases")
