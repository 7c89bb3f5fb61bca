"""The schema as released at 48b3a80 (what `create_all` made before there were migrations).

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Every table of this revision: a database without alembic_version that has them all was made
# by `create_all` of the released code, and is stamped with this revision (state.schema).
TABLES = ("models", "deployments", "events", "cost_intervals", "controller_lease", "usage")


def _ts(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("gpus_per_replica", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        _ts("last_used_at"),
        sa.Column("priority_override", sa.Integer(), nullable=True),
        sa.Column("keep_hot_override", sa.Float(), nullable=True),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.String(128), nullable=True),
        sa.Column("endpoint", sa.String(256), nullable=True),
        sa.Column("handle", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        *(
            _ts(f"{s}_at")
            for s in ("pending", "launching", "loading", "ready", "draining", "stopping", "stopped", "failed")
        ),
        _ts("last_used_at"),
    )
    op.create_index("ix_deployments_model", "deployments", ["model"])
    op.create_index("ix_deployments_state", "deployments", ["state"])
    op.create_index("ix_deployments_model_state", "deployments", ["model", "state"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True),
        _ts("at", nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("deployment_id", sa.String(32), nullable=True),
        sa.Column("message", sa.String(), nullable=False),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_index("ix_events_kind", "events", ["kind"])
    op.create_index("ix_events_model", "events", ["model"])
    op.create_table(
        "cost_intervals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("deployment_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("cluster", sa.String(128), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("hourly_price", sa.Float(), nullable=False),
        _ts("started_at", nullable=False),
        _ts("ended_at"),
        _ts("checked_at"),
    )
    op.create_index("ix_cost_intervals_model", "cost_intervals", ["model"])
    op.create_index("ix_cost_intervals_started_at", "cost_intervals", ["started_at"])
    op.create_index("ix_cost_open", "cost_intervals", ["deployment_id", "ended_at"])
    op.create_table(
        "controller_lease",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("holder", sa.String(256), nullable=False),
        _ts("expires_at", nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), primary_key=True),
        _ts("at", nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("deployment_id", sa.String(32), nullable=True),
        sa.Column("path", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
    )
    op.create_index("ix_usage_at", "usage", ["at"])
    op.create_index("ix_usage_model", "usage", ["model"])


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
