"""What the gateways of a fleet (several processes on one database) tell each other.

A mixin of `Store` (it uses `self.engine`). Followers read the deployments (where to route,
which starts ended) and write their reports; the lease holder reads the fresh reports. On
PostgreSQL every write here, and every deployment state change (`Store.transition`), also
sends a NOTIFY, so that the others need not wait for their next poll.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, or_, text
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from state.machine import TERMINAL, DeploymentState
from state.tables import Deployment, Event, GatewayPresence, GatewayReport

# NOTIFY channels (PostgreSQL): a deployment changed state; a gateway wrote a report that asks
# for a launch.
DEPLOYMENTS_CHANNEL = "llmgw_deployments"
REPORTS_CHANNEL = "llmgw_reports"


def notify(conn: Connection | Session, channel: str) -> None:
    """NOTIFY `channel` when the transaction commits (PostgreSQL only; elsewhere nothing)."""
    dialect = conn.dialect if isinstance(conn, Connection) else conn.get_bind().dialect
    if dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})


@dataclass(frozen=True)
class ReadyDeployment:
    id: str
    model: str
    endpoint: str


@dataclass(frozen=True)
class EndedStart:
    """A deployment that ended without serving (failed, or stopped before it was ready)."""

    id: str
    model: str
    failed: bool
    error: str | None
    ended_at: datetime


@dataclass(frozen=True)
class FleetView:
    ready: list[ReadyDeployment]
    starting: dict[str, str]  # models with a deployment on its way up, and its state
    ended: list[EndedStart]  # starts that ended since the time asked for, oldest first
    # The newest admin reset of failures since then, by model (None: every model's).
    resets: dict[str | None, datetime] = field(default_factory=dict)


_DEPLOYMENTS = Deployment.__table__  # type: ignore[attr-defined]
_EVENTS = Event.__table__  # type: ignore[attr-defined]
# The event of an admin's reset of failures (gateway/control/controller.py writes it).
FAILURE_RESET = "failure-reset"


def _resets(conn: Connection, since: datetime) -> dict[str | None, datetime]:
    """The newest reset of failures since `since`, by model (None: all of them)."""
    t = _EVENTS
    q = (
        sa_select(t.c.model, func.max(t.c.at))
        .where(t.c.kind == FAILURE_RESET, t.c.at >= since)
        .group_by(t.c.model)
    )
    return {model: at for model, at in conn.execute(q)}


_STARTING = [s.value for s in (DeploymentState.PENDING, DeploymentState.LAUNCHING, DeploymentState.LOADING)]
_TERMINAL = [s.value for s in TERMINAL]


class FleetStore:
    engine: Engine

    def fleet_view(self, ended_since: datetime) -> FleetView:
        """Ready deployments with their endpoints, the models starting, and the starts that
        ended (failed, or stopped never ready) since `ended_since`: one read transaction."""
        t = _DEPLOYMENTS
        live = t.c.state.not_in(_TERMINAL)
        ended = t.c.state.in_(_TERMINAL) & or_(
            t.c.failed_at >= ended_since, (t.c.stopped_at >= ended_since) & t.c.ready_at.is_(None)
        )
        q = sa_select(
            t.c.id, t.c.model, t.c.state, t.c.endpoint, t.c.error, t.c.failed_at, t.c.stopped_at
        ).where(live | ended)
        ready: list[ReadyDeployment] = []
        starting: dict[str, str] = {}
        out: list[EndedStart] = []
        with self.engine.connect() as conn:
            for dep_id, model, state, endpoint, error, failed_at, stopped_at in conn.execute(q):
                if state == DeploymentState.READY.value and endpoint:
                    ready.append(ReadyDeployment(dep_id, model, endpoint))
                elif state in _STARTING:
                    starting[model] = max(starting.get(model, state), state, key=_STARTING.index)
                elif state in _TERMINAL:
                    at = failed_at or stopped_at
                    assert at is not None
                    failed = state == DeploymentState.FAILED.value
                    out.append(EndedStart(dep_id, model, failed, error, at))
            resets = _resets(conn, ended_since)
        out.sort(key=lambda e: e.ended_at)
        return FleetView(ready, starting, out, resets)

    def write_reports(
        self, gateway_id: str, rows: Collection[Mapping[str, Any]], *, at: datetime, urgent: bool = False
    ) -> None:
        """Replace the reports of `gateway_id` by `rows` (model, in_flight, waiting,
        deployments, last_used_at), and mark it seen at `at` (its presence); `urgent` (a model
        got its first waiting request) also notifies the lease holder."""
        with self.engine.begin() as conn:
            conn.execute(delete(GatewayReport).where(col(GatewayReport.gateway_id) == gateway_id))
            conn.execute(delete(GatewayPresence).where(col(GatewayPresence.gateway_id) == gateway_id))
            conn.execute(insert(GatewayPresence), [{"gateway_id": gateway_id, "seen_at": at}])
            if rows:
                conn.execute(
                    insert(GatewayReport), [{**r, "gateway_id": gateway_id, "reported_at": at} for r in rows]
                )
            if urgent:
                notify(conn, REPORTS_CHANNEL)

    def fresh_reports(self, since: datetime, *, exclude: str | None = None) -> list[GatewayReport]:
        """The reports written at `since` or later (older ones are of gateways gone quiet)."""
        with Session(self.engine) as s:
            q = select(GatewayReport).where(col(GatewayReport.reported_at) >= since)
            if exclude is not None:
                q = q.where(col(GatewayReport.gateway_id) != exclude)
            return list(s.exec(q))

    def live_gateways(self, since: datetime, *, exclude: str | None = None) -> list[str]:
        """The gateways that reported at `since` or later (their presence), but `exclude`."""
        with Session(self.engine) as s:
            q = select(GatewayPresence.gateway_id).where(col(GatewayPresence.seen_at) >= since)
            if exclude is not None:
                q = q.where(col(GatewayPresence.gateway_id) != exclude)
            return sorted(s.exec(q))

    def delete_reports(self, gateway_id: str) -> None:
        """The reports and the presence of a gateway that stops (or acts from now on)."""
        with self.engine.begin() as conn:
            conn.execute(delete(GatewayReport).where(col(GatewayReport.gateway_id) == gateway_id))
            conn.execute(delete(GatewayPresence).where(col(GatewayPresence.gateway_id) == gateway_id))
