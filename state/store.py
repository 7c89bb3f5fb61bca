"""The store: every read and write of persistent state goes through here.

SQLite by default (WAL mode, so readers never block the writer), or PostgreSQL (psycopg); the
schema is Alembic's (state.schema, state/migrations).
Deployment state changes are compare-and-swap: `UPDATE ... WHERE id = :id AND state = :expected`,
so two writers can never both move a deployment out of the same state.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, case, event, func, insert, literal, or_, update
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Float
from sqlmodel import Session, col, create_engine, select

from state import schema
from state.fleet_store import DEPLOYMENTS_CHANNEL, FleetStore, notify
from state.key_store import KeyStore
from state.machine import TERMINAL, TIMESTAMP_COLUMN, DeploymentState, check_transition
from state.schema import SchemaStatus
from state.tables import (
    ControllerLease,
    CostInterval,
    Deployment,
    Event,
    Installation,
    ModelRecord,
    UTCDateTime,
    utcnow,
)
from state.usage_store import UsageStore

# Ids per `IN (...)` list: below SQLite's limit of bound parameters in one statement.
IN_CHUNK = 900

# How long a SQLite connection waits for a lock held by another writer before failing.
SQLITE_BUSY_TIMEOUT_MS = 5000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class SecondsBetween(FunctionElement[float]):
    """Seconds from the first timestamp to the second, computed by the database."""

    type = Float()
    inherit_cache = True

    def __init__(self, start: ColumnElement[datetime], end: ColumnElement[datetime]) -> None:
        super().__init__(start, end)


def _sqlite_epoch(compiler: SQLCompiler, expr: Any) -> tuple[str, str]:
    """Whole seconds and the fraction of a timestamp as SQLAlchemy stores it in SQLite
    ('YYYY-MM-DD HH:MM:SS.ffffff'): exact to the microsecond, unlike julianday()."""
    text = compiler.process(expr)
    return f"CAST(strftime('%s', {text}) AS INTEGER)", f"CAST(substr({text}, 20) AS REAL)"


@compiles(SecondsBetween, "sqlite")
def _seconds_sqlite(element: SecondsBetween, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = list(element.clauses)
    (s_int, s_frac), (e_int, e_frac) = _sqlite_epoch(compiler, start), _sqlite_epoch(compiler, end)
    return f"(({e_int} - {s_int}) + ({e_frac} - {s_frac}))"


@compiles(SecondsBetween, "postgresql")
def _seconds_postgresql(element: SecondsBetween, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = list(element.clauses)
    return f"EXTRACT(EPOCH FROM ({compiler.process(end)} - {compiler.process(start)}))"


_SECONDS_DIALECTS = ("sqlite", "postgresql")


def _totals_in_python(
    intervals: Iterable[CostInterval], now: datetime
) -> dict[tuple[str, str], tuple[float, float]]:
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for i in intervals:
        seconds = max(((i.ended_at or now) - i.started_at).total_seconds(), 0.0)
        gpu_s, dollars = out.get((i.model, i.phase), (0.0, 0.0))
        out[(i.model, i.phase)] = (gpu_s + seconds * i.gpus, dollars + seconds / 3600 * i.hourly_price)
    return out


_COST = CostInterval.__table__  # type: ignore[attr-defined]
_OPEN_OF = (_COST.c.deployment_id == bindparam("b_dep"), _COST.c.ended_at.is_(None))
_CLOSE_OPEN = update(_COST).where(*_OPEN_OF).values(ended_at=bindparam("b_at", type_=UTCDateTime()))
_RELABEL_OPEN = update(_COST).where(*_OPEN_OF).values(phase=bindparam("b_phase"))


@dataclass(frozen=True)
class IntervalChange:
    """One cost-ledger change: open a new interval (closing the deployment's open one at its
    start), or relabel the open one's phase. `open` holds the new row's columns (plain values:
    a tick may open 1,000 intervals, and ORM objects cost ~50 us each to build)."""

    deployment_id: str
    open: Mapping[str, Any] | None = None
    relabel: str | None = None


class Store(UsageStore, KeyStore, FleetStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def status(self) -> SchemaStatus:
        """The schema's revision and this code's (SchemaError: tables of unknown origin)."""
        return schema.status(self.engine)

    def upgrade(self) -> SchemaStatus:
        """Bring the schema to this code's revision (Alembic; see state.schema)."""
        return schema.upgrade(self.engine)

    def prepare(self, *, upgrade_allowed: bool) -> SchemaStatus:
        """At startup: create an empty database, refuse (SchemaError) one of another revision
        unless `upgrade_allowed` and it is older."""
        return schema.prepare(self.engine, upgrade_allowed=upgrade_allowed)

    def close(self) -> None:
        self.engine.dispose()

    def instance_id(self) -> str:
        """This installation's id: made at the first start, the same ever after."""
        with Session(self.engine) as s:
            row = s.get(Installation, 1)
            if row is not None:
                return row.instance_id
            s.add(Installation(id=1, instance_id=secrets.token_hex(6)))
            try:
                s.commit()
            except IntegrityError:  # another gateway made it at the same moment
                s.rollback()
            row = s.get(Installation, 1)
            assert row is not None
            return row.instance_id

    # -- models ---------------------------------------------------------------------------

    def upsert_models(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write the reference file's values of every model (`id` and the columns to set): one
        bulk insert of the new ones and one bulk update of the known ones (10,000 models in well
        under a second; no ORM object per model)."""
        values = {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in records}
        with Session(self.engine) as s:
            known: set[str] = set()
            ids = list(values)
            for start in range(0, len(ids), IN_CHUNK):
                chunk = ids[start : start + IN_CHUNK]
                known.update(s.exec(select(ModelRecord.id).where(col(ModelRecord.id).in_(chunk))))
            new = [{"id": m, **v} for m, v in values.items() if m not in known]
            old = [{"id": m, **v} for m, v in values.items() if m in known]
            if new:
                s.execute(insert(ModelRecord), new)
            if old:
                s.execute(update(ModelRecord), old)
            s.commit()

    def touch_models(
        self, last_used: Mapping[str, datetime], deployments: Mapping[str, datetime] | None = None
    ) -> None:
        """Write a batch of last-used times (collected in memory by the gateway) of models and of
        their live deployments, in one transaction with one statement per table."""
        if not last_used and not deployments:
            return
        with Session(self.engine) as s:
            known = set(s.exec(select(ModelRecord.id).where(col(ModelRecord.id).in_(list(last_used)))))
            missing = [ModelRecord(id=m, last_used_at=at) for m, at in last_used.items() if m not in known]
            s.add_all(missing)
            rows = [{"id": m, "last_used_at": at} for m, at in last_used.items() if m in known]
            if rows:
                s.execute(update(ModelRecord), rows)
            if deployments:
                s.execute(
                    update(Deployment), [{"id": d, "last_used_at": at} for d, at in deployments.items()]
                )
            s.commit()

    def set_overrides(self, model_id: str, *, priority: int | None, keep_hot_seconds: float | None) -> None:
        with Session(self.engine) as s:
            row = s.get(ModelRecord, model_id) or ModelRecord(id=model_id)
            row.priority_override = priority
            row.keep_hot_override = keep_hot_seconds
            s.add(row)
            s.commit()

    def overrides(self) -> dict[str, dict[str, object]]:
        """Admin overrides by model, in the reference file's field names."""
        out: dict[str, dict[str, object]] = {}
        with Session(self.engine) as s:
            for row in s.exec(select(ModelRecord)):
                fields: dict[str, object] = {
                    "priority": row.priority_override,
                    "keep_hot_seconds": row.keep_hot_override,
                }
                kept = {k: v for k, v in fields.items() if v is not None}
                if kept:
                    out[row.id] = kept
        return out

    def models_last_used(self) -> dict[str, datetime]:
        with Session(self.engine) as s:
            q = select(ModelRecord.id, ModelRecord.last_used_at).where(
                col(ModelRecord.last_used_at).is_not(None)
            )
            return {model: at for model, at in s.exec(q) if at is not None}

    def get_model(self, model_id: str) -> ModelRecord | None:
        with Session(self.engine) as s:
            return s.get(ModelRecord, model_id)

    # -- deployments ----------------------------------------------------------------------

    def create_deployment(
        self,
        *,
        deployment_id: str,
        model: str,
        provider: str,
        gpus: int,
        at: datetime | None = None,
        started_by: str | None = None,
    ) -> Deployment:
        dep = Deployment(
            id=deployment_id,
            model=model,
            provider=provider,
            gpus=gpus,
            started_by=started_by,
            state=DeploymentState.PENDING.value,
            pending_at=at or utcnow(),
        )
        with Session(self.engine) as s:
            s.add(dep)
            s.commit()
            s.refresh(dep)
        return dep

    def transition(
        self,
        deployment_id: str,
        *,
        expected: DeploymentState,
        new: DeploymentState,
        at: datetime | None = None,
        **fields: Any,
    ) -> bool:
        """Move a deployment from `expected` to `new`; False if it was not in `expected`.

        Raises InvalidTransition when the state machine does not allow `expected -> new`.
        Extra keyword arguments are columns written in the same statement (endpoint, error, ...).
        """
        check_transition(expected, new)
        values: dict[str, Any] = {"state": new.value, TIMESTAMP_COLUMN[new]: at or utcnow(), **fields}
        stmt = (
            update(Deployment)
            .where(col(Deployment.id) == deployment_id, col(Deployment.state) == expected.value)
            .values(**values)
        )
        with Session(self.engine) as s:
            result = s.exec(stmt)
            moved = bool(result.rowcount == 1)
            if moved:
                notify(s, DEPLOYMENTS_CHANNEL)  # the other gateways of a fleet route by it
            s.commit()
            return moved

    def update_deployment(self, deployment_id: str, **fields: Any) -> None:
        """Write columns that are not the state (handle, cluster, endpoint, last_used_at)."""
        if "state" in fields:
            raise ValueError("use transition() to change a deployment's state")
        with Session(self.engine) as s:
            s.exec(update(Deployment).where(col(Deployment.id) == deployment_id).values(**fields))
            s.commit()

    def get_deployment(self, deployment_id: str) -> Deployment | None:
        with Session(self.engine) as s:
            return s.get(Deployment, deployment_id)

    def live_deployments(self) -> list[Deployment]:
        """Deployments not yet stopped or failed: what may still hold an engine."""
        terminal = [s.value for s in TERMINAL]
        with Session(self.engine) as s:
            rows = s.exec(select(Deployment).where(col(Deployment.state).not_in(terminal)))
            return list(rows)

    def deployments(self, *, model: str | None = None, limit: int = 100) -> list[Deployment]:
        with Session(self.engine) as s:
            q = select(Deployment).order_by(col(Deployment.pending_at).desc()).limit(limit)
            if model is not None:
                q = q.where(col(Deployment.model) == model)
            return list(s.exec(q))

    # -- events and usage -----------------------------------------------------------------

    def record_event(
        self,
        *,
        kind: str,
        model: str | None = None,
        deployment_id: str | None = None,
        message: str = "",
        at: datetime | None = None,
    ) -> None:
        with Session(self.engine) as s:
            s.add(
                Event(at=at or utcnow(), kind=kind, model=model, deployment_id=deployment_id, message=message)
            )
            s.commit()

    def events(
        self,
        *,
        model: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        """Events in time order, oldest first (the newest `limit` of them)."""
        with Session(self.engine) as s:
            q = select(Event).order_by(col(Event.id).desc()).limit(limit)
            if model is not None:
                q = q.where(col(Event.model) == model)
            if kind is not None:
                q = q.where(col(Event.kind) == kind)
            if since is not None:
                q = q.where(col(Event.at) >= since)
            if until is not None:
                q = q.where(col(Event.at) < until)
            return list(reversed(list(s.exec(q))))

    # -- cost intervals -------------------------------------------------------------------

    def open_interval(self, interval: CostInterval) -> None:
        """Close the deployment's open interval (if any) at the new one's start, then open it."""
        row = interval.model_dump(exclude={"id"})
        self.change_intervals([IntervalChange(deployment_id=interval.deployment_id, open=row)])

    def change_intervals(self, changes: Iterable[IntervalChange]) -> None:
        """Apply ledger changes in one transaction: first close or relabel the open intervals,
        then insert the new ones, one statement each (executemany: a tick may change 1,000
        deployments; a deployment has at most one change)."""
        closes, relabels, inserts = [], [], []
        for change in changes:
            if change.open is not None:
                closes.append({"b_dep": change.deployment_id, "b_at": change.open["started_at"]})
                inserts.append(dict(change.open))
            elif change.relabel is not None:
                relabels.append({"b_dep": change.deployment_id, "b_phase": change.relabel})
        with self.engine.begin() as conn:  # core statements: no ORM session to synchronise
            if closes:
                conn.execute(_CLOSE_OPEN, closes)
            if relabels:
                conn.execute(_RELABEL_OPEN, relabels)
            if inserts:
                conn.execute(insert(CostInterval), inserts)

    def close_interval(
        self, deployment_id: str, *, at: datetime, relabel: dict[str, str] | None = None
    ) -> None:
        """Close the deployment's open interval; `relabel` renames phases of all its intervals
        (a failed launch turns its cold time into failed time)."""
        with Session(self.engine) as s:
            open_ = (col(CostInterval.deployment_id) == deployment_id, col(CostInterval.ended_at).is_(None))
            s.exec(update(CostInterval).where(*open_, col(CostInterval.started_at) <= at).values(ended_at=at))
            # Closed before it began (a vanished cluster billed up to when it was last known to
            # run, and the interval opened after that): it lasted no time.
            s.exec(update(CostInterval).where(*open_).values(ended_at=col(CostInterval.started_at)))
            for old, new in (relabel or {}).items():
                s.exec(
                    update(CostInterval)
                    .where(col(CostInterval.deployment_id) == deployment_id, col(CostInterval.phase) == old)
                    .values(phase=new)
                )
            s.commit()

    def bill_orphan(self, deployment_id: str, cluster: str, *, until: datetime) -> bool:
        """A cluster the deployment launched ran on after its row ended (its gateway died before
        recording it) and was stopped at `until`: the deployment's last interval, closed, naming
        no other cluster and the cluster's latest, is extended to `until` and names it. True if
        billed so."""
        with Session(self.engine) as s:
            last = s.exec(
                select(CostInterval)
                .where(col(CostInterval.deployment_id) == deployment_id)
                .order_by(col(CostInterval.started_at).desc())
            ).first()
            if last is None or last.ended_at is None or last.ended_at >= until:
                return False
            if last.cluster not in (None, cluster):
                return False
            later = s.exec(
                select(CostInterval).where(
                    col(CostInterval.cluster) == cluster,
                    col(CostInterval.deployment_id) != deployment_id,
                    col(CostInterval.started_at) >= last.started_at,
                )
            ).first()
            if later is not None:  # billed to another deployment since: not this one's to extend
                return False
            last.ended_at, last.cluster = until, cluster
            s.add(last)
            s.commit()
            return True

    def update_open_interval(self, deployment_id: str, **fields: Any) -> None:
        with Session(self.engine) as s:
            s.exec(
                update(CostInterval)
                .where(col(CostInterval.deployment_id) == deployment_id, col(CostInterval.ended_at).is_(None))
                .values(**fields)
            )
            s.commit()

    def delete_intervals(self, deployment_id: str) -> None:
        with Session(self.engine) as s:
            for row in s.exec(select(CostInterval).where(col(CostInterval.deployment_id) == deployment_id)):
                s.delete(row)
            s.commit()

    def check_open_intervals(self, at: datetime) -> None:
        with Session(self.engine) as s:
            s.exec(update(CostInterval).where(col(CostInterval.ended_at).is_(None)).values(checked_at=at))
            s.commit()

    def open_intervals(self) -> list[CostInterval]:
        with Session(self.engine) as s:
            return list(s.exec(select(CostInterval).where(col(CostInterval.ended_at).is_(None))))

    def intervals(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[CostInterval]:
        """Intervals overlapping [since, until) (open ones included)."""
        with Session(self.engine) as s:
            q = select(CostInterval).order_by(col(CostInterval.started_at))
            if until is not None:
                q = q.where(col(CostInterval.started_at) < until)
            if since is not None:
                q = q.where(or_(col(CostInterval.ended_at).is_(None), col(CostInterval.ended_at) > since))
            return list(s.exec(q))

    def cost_totals(self, now: datetime) -> dict[tuple[str, str], tuple[float, float]]:
        """(GPU-seconds, dollars) by (model, phase) over all intervals, open ones up to `now`:
        summed by the database (one aggregate query, no rows loaded)."""
        if self.engine.dialect.name not in _SECONDS_DIALECTS:
            return _totals_in_python(self.intervals(), now)
        t = CostInterval.__table__  # type: ignore[attr-defined]
        end = func.coalesce(t.c.ended_at, literal(now, UTCDateTime()))
        raw = SecondsBetween(t.c.started_at, end)
        seconds = case((raw > 0, raw), else_=0.0)
        q = select(
            t.c.model,
            t.c.phase,
            func.sum(seconds * t.c.gpus),
            func.sum(seconds * t.c.hourly_price / 3600.0),
        ).group_by(t.c.model, t.c.phase)
        with self.engine.connect() as conn:
            return {(m, p): (float(g or 0.0), float(d or 0.0)) for m, p, g, d in conn.execute(q)}

    # -- controller lease -----------------------------------------------------------------

    def acquire_lease(
        self, holder: str, *, now: datetime, until: datetime, steal_from: str | None = None
    ) -> bool:
        """Take or renew the controller lease: succeeds if it is free, expired, ours, or held by
        `steal_from` (a holder known to be dead). A single conditional UPDATE (or INSERT of the
        first row), so two gateways can never both hold it."""
        with Session(self.engine) as s:
            cond = or_(col(ControllerLease.holder) == holder, col(ControllerLease.expires_at) < now)
            if steal_from is not None:
                cond = or_(cond, col(ControllerLease.holder) == steal_from)
            result = s.exec(
                update(ControllerLease)
                .where(col(ControllerLease.id) == 1, cond)
                .values(holder=holder, expires_at=until)
            )
            if result.rowcount == 1:
                s.commit()
                return True
            if s.get(ControllerLease, 1) is not None:
                return False
            s.add(ControllerLease(id=1, holder=holder, expires_at=until))
            try:
                s.commit()
            except IntegrityError:
                return False
            return True

    def renew_lease(self, holder: str, *, until: datetime) -> bool:
        """Extend the lease only if `holder` still holds it, expired or not. False once another
        gateway took it meanwhile, even if that one's lease has expired since: the rows it
        changed are not what this holder remembers, so it must not act on as if it had held on."""
        with Session(self.engine) as s:
            result = s.exec(
                update(ControllerLease)
                .where(col(ControllerLease.id) == 1, col(ControllerLease.holder) == holder)
                .values(expires_at=until)
            )
            s.commit()
            return bool(result.rowcount == 1)

    def lease(self) -> ControllerLease | None:
        with Session(self.engine) as s:
            return s.get(ControllerLease, 1)

    def release_lease(self, holder: str) -> None:
        with Session(self.engine) as s:
            row = s.get(ControllerLease, 1)
            if row is not None and row.holder == holder:
                s.delete(row)
                s.commit()
