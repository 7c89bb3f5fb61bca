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
    spare_at: datetime | None = _ts()
    stopping_at: datetime | None = _ts()
    stopped_at: datetime | None = _ts()
    failed_at: datetime | None = _ts()
    last_used_at: datetime | None = _ts()
    # Who caused the start (its cold-start cost is theirs): a client API key's id, `admin` for an
    # admin load or a pre-warm, None when unknown (open access, adopted engines).
    started_by: str | None = Field(default=None, max_length=64)

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

    Phases: cold (launching, loading), serving, idle, spare (kept up after the keep-hot time for
    another cold start), failed (a launch that did not become ready). `ended_at` is None while the interval is open; `checked_at` is the last time a
    running gateway saw it open (used to close it after a crash)."""

    __tablename__ = "cost_intervals"
    __table_args__ = (
        Index("ix_cost_open", "deployment_id", "ended_at"),
        # The open intervals (ended_at NULL) of every deployment: checked at each tick.
        Index("ix_cost_ended", "ended_at"),
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


class ApiKey(SQLModel, table=True):
    """A client API key for the OpenAI routes. Only the SHA-256 of the key is stored (the key is
    shown once, at creation); `id` is its public name in usage, costs and logs."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=64)
    key_hash: str = Field(index=True, unique=True, max_length=64)  # hex SHA-256 of the whole key
    name: str = Field(max_length=256)
    team: str = Field(default="", index=True, max_length=256)  # owner or team label, for chargeback
    models: str = '["*"]'  # JSON list of glob patterns of the model ids the key may use
    may_wake: bool = True  # may start a model that is not running
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_budget: float | None = None  # dollars per UTC calendar month
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    expires_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()


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
    """One row per proxied request: optional (`usage.raw_rows`), pruned after
    `usage.retention_days`. The durable record is `UsageMinute`."""

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
    api_key_id: str | None = Field(default=None, max_length=64)  # None: a request without a key


# Upper bounds (milliseconds) of the request-latency buckets kept per minute: the same edges as
# the gateway's `llmgw_request_duration_seconds` histogram. Counts are per bucket (not
# cumulative); the last column counts the requests slower than the last bound.
LATENCY_BOUNDS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000)
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
# The columns that identify a rollup row; the others are sums.
USAGE_KEY_COLUMNS = ("minute", "model", "path", "status", "stream", "api_key_id")
USAGE_SUM_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "latency_ms_sum", *LATENCY_COLUMNS)


class UsageMinute(SQLModel, table=True):
    """Requests of one minute, per model, endpoint, status, streamed or not and API key: the
    durable usage record (costs, dashboards and the S3 export read it). Rows are added to at
    every flush; readers sum over the key, so a second row for the same key (two gateways
    flushing the same minute) changes nothing."""

    __tablename__ = "usage_minutes"
    __table_args__ = (Index("ix_usage_minutes_key", "minute", "model", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    minute: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))  # start of the minute
    model: str = Field(index=True, max_length=256)
    path: str = Field(max_length=64)
    status: int
    stream: bool = False
    api_key_id: str | None = Field(default=None, max_length=64)  # None: a request without a key
    requests: int = 0
    prompt_tokens: int = 0  # as reported by the engines (requests without usage add nothing)
    completion_tokens: int = 0
    latency_ms_sum: float = 0.0
    lat_10ms: int = 0
    lat_25ms: int = 0
    lat_50ms: int = 0
    lat_100ms: int = 0
    lat_250ms: int = 0
    lat_500ms: int = 0
    lat_1s: int = 0
    lat_2_5s: int = 0
    lat_5s: int = 0
    lat_10s: int = 0
    lat_30s: int = 0
    lat_60s: int = 0
    lat_120s: int = 0
    lat_300s: int = 0
    lat_inf: int = 0


class GatewayReport(SQLModel, table=True):
    """What one gateway process of a fleet reports about one model: its requests in flight (in
    all and per deployment, as JSON), those waiting for a start, and its last request. Written by
    every gateway that is not the lease holder; the holder reads the fresh ones: waiting requests
    for a model with no live deployment are a launch request, in-flight counts and last-used
    times feed idle teardown, drains and the autoscaler, an engine it could not reach is checked.
    A row is the gateway's newest report."""

    __tablename__ = "gateway_reports"

    gateway_id: str = Field(primary_key=True, max_length=256)  # its lease holder id
    model: str = Field(primary_key=True, max_length=256)
    in_flight: int = 0
    waiting: int = 0
    deployments: str = "{}"  # JSON: deployment id -> requests in flight
    failing: str = "[]"  # JSON: deployments it could not reach since its last report
    last_used_at: datetime | None = _ts()
    reported_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))


class GatewayPresence(SQLModel, table=True):
    """A gateway of a fleet that follows (not the lease holder), seen alive: written with each of
    its reports, every `fleet.report_seconds`, even when it has nothing to report. A holder that
    stops gracefully hands its engines over (leaves them running for the next holder to adopt)
    only while another gateway was seen lately."""

    __tablename__ = "gateway_presence"

    gateway_id: str = Field(primary_key=True, max_length=256)  # its lease holder id
    seen_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
