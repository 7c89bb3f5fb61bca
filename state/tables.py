"""SQLModel tables. Times are timezone-aware UTC datetimes; ids of deployments are short hex strings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Dialect, Index
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from state.machine import DeploymentState


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC and always reads back timezone-aware datetimes (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts() -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class ModelRecord(SQLModel, table=True):
    """One row per model the gateway has seen: its reference values and when it was last used."""

    __tablename__ = "models"

    id: str = Field(primary_key=True, max_length=256)
    gpus_per_replica: int = 1
    priority: int = 0
    kind: str = "chat"
    last_used_at: datetime | None = _ts()
    # Set by admins, kept across restarts and reloads of the reference file; None = the file's value.
    priority_override: int | None = None
    keep_hot_override: float | None = None


class Deployment(SQLModel, table=True):
    """One engine serving one model, from the launch request to its teardown."""

    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_model_state", "model", "state"),)

    id: str = Field(primary_key=True, max_length=32)
    model: str = Field(index=True, max_length=256)
    state: str = Field(default=DeploymentState.PENDING.value, index=True, max_length=16)
    provider: str = Field(max_length=32)
    gpus: int = 1
    cluster: str | None = Field(default=None, max_length=128)  # provider's name for where it runs
    endpoint: str | None = Field(default=None, max_length=256)
    # Provider-specific handle (process group, start time, GPU ids, ...) as JSON, to stop or
    # adopt the engine after a restart of the gateway.
    handle: str | None = None
    error: str | None = None
    pending_at: datetime | None = _ts()
    launching_at: datetime | None = _ts()
    loading_at: datetime | None = _ts()
    ready_at: datetime | None = _ts()
    draining_at: datetime | None = _ts()
    stopping_at: datetime | None = _ts()
    stopped_at: datetime | None = _ts()
    failed_at: datetime | None = _ts()
    last_used_at: datetime | None = _ts()

    @property
    def current(self) -> DeploymentState:
        return DeploymentState(self.state)


class Event(SQLModel, table=True):
    """Append-only log of control decisions and why they were taken."""

    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    kind: str = Field(index=True, max_length=32)  # launch, ready, idle-stop, launch-failed, ...
    model: str | None = Field(default=None, index=True, max_length=256)
    deployment_id: str | None = Field(default=None, max_length=32)
    message: str = ""


class CostInterval(SQLModel, table=True):
    """A stretch of time one deployment held a cluster's GPUs in one phase, with its price.

    Phases: cold (launching, loading), serving, idle, failed (a launch that did not become
    ready). `ended_at` is None while the interval is open; `checked_at` is the last time a
    running gateway saw it open (used to close it after a crash)."""

    __tablename__ = "cost_intervals"
    __table_args__ = (
        Index("ix_cost_open", "deployment_id", "ended_at"),
        Index("ix_cost_ended", "ended_at"),  # the open ones (ended_at IS NULL) without a scan
    )

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(max_length=32)
    model: str = Field(index=True, max_length=256)
    cluster: str | None = Field(default=None, max_length=128)
    provider: str = Field(max_length=32)
    phase: str = Field(max_length=16)
    gpus: int = 1
    hourly_price: float = 0.0  # dollars per hour for the whole cluster
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    ended_at: datetime | None = _ts()
    checked_at: datetime | None = _ts()


class CostTotalRow(SQLModel, table=True):
    """Dollars and GPU-seconds of the closed cost intervals, by model and phase, kept by the
    store in the same transaction as each change of a closed interval (close, relabel, delete),
    so /metrics reads a row per model and phase instead of every interval ever."""

    __tablename__ = "cost_totals"

    model: str = Field(primary_key=True, max_length=256)
    phase: str = Field(primary_key=True, max_length=16)
    dollars: float = 0.0
    gpu_seconds: float = 0.0


class ControllerLease(SQLModel, table=True):
    """Which gateway process runs the control loop on this database (one row, id 1)."""

    __tablename__ = "controller_lease"

    id: int = Field(default=1, primary_key=True)
    holder: str = Field(max_length=256)  # host:pid:start-time:random
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Installation(SQLModel, table=True):
    """One row: this installation's id, written once. Every cluster carries it as a label, so
    one installation never touches another's clusters on a shared SkyPilot user or cloud."""

    __tablename__ = "installation"
    id: int = Field(default=1, primary_key=True)
    instance_id: str


class Usage(SQLModel, table=True):
    """One row per proxied request."""

    __tablename__ = "usage"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    model: str = Field(index=True, max_length=256)
    deployment_id: str | None = Field(default=None, max_length=32)
    path: str = Field(max_length=64)
    status: int
    stream: bool = False
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
