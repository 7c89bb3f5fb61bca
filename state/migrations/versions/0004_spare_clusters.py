"""Spare clusters: when a deployment became a spare (state `spare`, ledger phase `spare`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 14:11:57.913744
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spare_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("spare_at")
