"""Since 48b3a80: the installation id, per-minute usage rollups, the index of open intervals.

A database made by `create_all` of code between 48b3a80 and this revision has some of these
already (and one from before d0b4972 lacks the admin override columns): each step here is done
only when its table, column or index is missing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LATENCY_COLUMNS = (
    "lat_10ms",
    "lat_25ms",
    "lat_50ms",
    "lat_100ms",
    "lat_250ms",
    "lat_500ms",
    "lat_1s",
    "lat_2_5s",
    "lat_5s",
    "lat_10s",
    "lat_30s",
    "lat_60s",
    "lat_120s",
    "lat_300s",
    "lat_inf",
)


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=False)


def _usage_minutes() -> None:
    op.create_table(
        "usage_minutes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("path", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("api_key_id", sa.String(64), nullable=True),
        _count("requests"),
        _count("prompt_tokens"),
        _count("completion_tokens"),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        *(_count(c) for c in LATENCY_COLUMNS),
    )
    op.create_index("ix_usage_minutes_model", "usage_minutes", ["model"])
    op.create_index("ix_usage_minutes_key", "usage_minutes", ["minute", "model", "status"])


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    if "installation" not in tables:
        op.create_table(
            "installation",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("instance_id", sa.String(), nullable=False),
        )
    if "usage_minutes" not in tables:
        _usage_minutes()
    if "ix_cost_ended" not in {i["name"] for i in inspector.get_indexes("cost_intervals")}:
        op.create_index("ix_cost_ended", "cost_intervals", ["ended_at"])
    overrides: list[sa.Column[Any]] = [
        sa.Column("priority_override", sa.Integer(), nullable=True),
        sa.Column("keep_hot_override", sa.Float(), nullable=True),
    ]
    missing = [c for c in overrides if c.name not in {c["name"] for c in inspector.get_columns("models")}]
    if missing:
        with op.batch_alter_table("models") as batch:
            for column in missing:
                batch.add_column(column)


def downgrade() -> None:
    op.drop_index("ix_cost_ended", table_name="cost_intervals")
    op.drop_table("usage_minutes")
    op.drop_table("installation")
