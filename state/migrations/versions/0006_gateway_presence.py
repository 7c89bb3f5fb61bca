"""Fleet: the followers seen alive (table gateway_presence), for the holder's graceful hand-over.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 19:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_presence",
        sa.Column("gateway_id", sa.String(256), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("gateway_id"),
    )
    with op.batch_alter_table("gateway_presence", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gateway_presence_seen_at"), ["seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("gateway_presence", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gateway_presence_seen_at"))

    op.drop_table("gateway_presence")
