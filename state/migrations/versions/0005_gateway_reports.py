"""Fleet: per-gateway reports of in-flight, waiting and last-used requests (table gateway_reports).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 16:01:05.119090
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_reports",
        sa.Column("gateway_id", sa.String(256), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("waiting", sa.Integer(), nullable=False),
        sa.Column("deployments", sa.String(), nullable=False),
        sa.Column("failing", sa.String(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", "model"),
    )
    with op.batch_alter_table("gateway_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gateway_reports_reported_at"), ["reported_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("gateway_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gateway_reports_reported_at"))

    op.drop_table("gateway_reports")
