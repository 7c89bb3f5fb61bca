"""The store: every read and write of persistent state goes through here.

SQLite by default (WAL mode, so readers never block the writer); any SQLAlchemy URL works.
Deployment state changes are compare-and-swap: `UPDATE ... WHERE id = :id AND state = :expected`,
so two writers can never both move a deployment out of the same state.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, delete, event, func, insert, or_, update
from sqlalchemy import select as core_select
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, create_engine, select

from state.machine import TERMINAL, TIMESTAMP_COLUMN, DeploymentState, check_transition
from state.tables import (
    ControllerLease,
    CostInterval,
    CostTotalRow,
    Deployment,
    Event,
    Installation,
    ModelRecord,
    Usage,
    utcnow,
)

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


@dataclass(frozen=True)
class IntervalChange:
    """One cost-ledger change: open a new interval (closing the deployment's open one at its
    start), or relabel the open one's phase."""

    deployment_id: str
    open: CostInterval | None = None
    relabel: str | None = None


class CostTotal(NamedTuple):
    dollars: float
    gpu_seconds: float


CostTotals = dict[tuple[str, str], CostTotal]  # by (model, phase)

# What `_roll_up` needs of an interval, as RETURNING columns of the statements that change one.
_COST_COLUMNS = (
    col(CostInterval.model),
    col(CostInterval.phase),
    col(CostInterval.gpus),
    col(CostInterval.hourly_price),
    col(CostInterval.started_at),
    col(CostInterval.ended_at),
)


def _add(totals: CostTotals, key: tuple[str, str], seconds: float, gpus: int, price: float) -> None:
    before = totals.get(key, CostTotal(0.0, 0.0))
    totals[key] = CostTotal(before.dollars + seconds / 3600 * price, before.gpu_seconds + seconds * gpus)


def _sum_closed(rows: Iterable[Any], *, sign: float = 1.0, phase: str | None = None) -> CostTotals:
    """Totals of the closed intervals among `rows` (of `_COST_COLUMNS`), under `phase` if given."""
    out: CostTotals = {}
    for model, row_phase, gpus, price, start, end in rows:
        if end is not None:
            _add(
                out, (model, phase or row_phase), sign * max((end - start).total_seconds(), 0.0), gpus, price
            )
    return out


def _roll_up(conn: Connection, delta: CostTotals) -> None:
    """Add `delta` to the cost_totals table (one row per model and phase)."""
    table = CostTotalRow.__table__  # type: ignore[attr-defined]
    for (model, phase), d in delta.items():
        key = (table.c.model == model, table.c.phase == phase)
        added = conn.execute(
            update(table)
            .where(*key)
            .values(dollars=table.c.dollars + d.dollars, gpu_seconds=table.c.gpu_seconds + d.gpu_seconds)
        )
        if added.rowcount == 0:
            conn.execute(
                insert(table).values(model=model, phase=phase, dollars=d.dollars, gpu_seconds=d.gpu_seconds)
            )


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def create_all(self) -> None:
        SQLModel.metadata.create_all(self.engine)
        for index in CostInterval.__table__.indexes:  # type: ignore[attr-defined]
            index.create(self.engine, checkfirst=True)  # added after the table was: create_all skips it
        self._backfill_cost_totals()

    def _backfill_cost_totals(self) -> None:
        """A database from before the cost_totals table: sum its closed intervals, once."""
        with self.engine.begin() as conn:
            if conn.execute(select(CostTotalRow).limit(1)).first() is not None:
                return
            closed = core_select(*_COST_COLUMNS).where(col(CostInterval.ended_at).is_not(None))
            _roll_up(conn, _sum_closed(conn.execution_options(yield_per=10_000).execute(closed)))

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

    def upsert_models(self, records: Iterable[ModelRecord]) -> None:
        with Session(self.engine) as s:
            for rec in records:
                row = s.get(ModelRecord, rec.id)
                if row is None:
                    s.add(ModelRecord.model_validate(rec.model_dump()))
                else:
                    row.gpus_per_replica = rec.gpus_per_replica
                    row.priority = rec.priority
                    row.kind = rec.kind
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

    def get_model(self, model_id: str) -> ModelRecord | None:
        with Session(self.engine) as s:
            return s.get(ModelRecord, model_id)

    # -- deployments ----------------------------------------------------------------------

    def create_deployment(
        self, *, deployment_id: str, model: str, provider: str, gpus: int, at: datetime | None = None
    ) -> Deployment:
        dep = Deployment(
            id=deployment_id,
            model=model,
            provider=provider,
            gpus=gpus,
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
            s.commit()
            return bool(result.rowcount == 1)

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
        self.change_intervals([IntervalChange(deployment_id=interval.deployment_id, open=interval)])

    def change_intervals(self, changes: Iterable[IntervalChange]) -> None:
        """Apply ledger changes in one transaction: first close or relabel the open intervals
        (adding what they cost to the totals), then insert the new ones in one statement (a
        deployment has at most one change)."""
        inserts = []
        with self.engine.begin() as conn:  # core statements: no ORM session to synchronise
            for change in changes:
                is_open = (
                    col(CostInterval.deployment_id) == change.deployment_id,
                    col(CostInterval.ended_at).is_(None),
                )
                if change.open is not None:
                    closing = update(CostInterval).where(*is_open).values(ended_at=change.open.started_at)
                    _roll_up(conn, _sum_closed(conn.execute(closing.returning(*_COST_COLUMNS))))
                    inserts.append(change.open.model_dump(exclude={"id"}))
                elif change.relabel is not None:
                    conn.execute(update(CostInterval).where(*is_open).values(phase=change.relabel))
            if inserts:
                conn.execute(insert(CostInterval), inserts)

    def close_interval(
        self, deployment_id: str, *, at: datetime, relabel: dict[str, str] | None = None
    ) -> None:
        """Close the deployment's open interval; `relabel` renames phases of all its intervals
        (a failed launch turns its cold time into failed time). The totals follow."""
        of_deployment = col(CostInterval.deployment_id) == deployment_id
        with self.engine.begin() as conn:
            closing = update(CostInterval).where(of_deployment, col(CostInterval.ended_at).is_(None))
            _roll_up(conn, _sum_closed(conn.execute(closing.values(ended_at=at).returning(*_COST_COLUMNS))))
            for old, new in (relabel or {}).items():
                renaming = update(CostInterval).where(of_deployment, col(CostInterval.phase) == old)
                moved = conn.execute(renaming.values(phase=new).returning(*_COST_COLUMNS)).all()
                _roll_up(conn, _sum_closed(moved, sign=-1.0, phase=old))
                _roll_up(conn, _sum_closed(moved))

    def update_open_interval(self, deployment_id: str, **fields: Any) -> None:
        with Session(self.engine) as s:
            s.exec(
                update(CostInterval)
                .where(col(CostInterval.deployment_id) == deployment_id, col(CostInterval.ended_at).is_(None))
                .values(**fields)
            )
            s.commit()

    def delete_intervals(self, deployment_id: str) -> None:
        with self.engine.begin() as conn:
            deleting = delete(CostInterval).where(col(CostInterval.deployment_id) == deployment_id)
            _roll_up(conn, _sum_closed(conn.execute(deleting.returning(*_COST_COLUMNS)), sign=-1.0))

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

    def cost_totals(self, now: datetime) -> CostTotals:
        """Dollars and GPU-seconds by (model, phase) over all time, open intervals up to `now`
        (what `gateway.accounting.costs.totals` computes from every interval). Reads one row per
        model and phase, plus the open intervals (one per live deployment)."""
        with self.engine.connect() as conn:
            totals = {
                (r.model, r.phase): CostTotal(max(r.dollars, 0.0), max(r.gpu_seconds, 0.0))
                for r in conn.execute(select(CostTotalRow))
            }
            still_open = conn.execute(core_select(*_COST_COLUMNS).where(col(CostInterval.ended_at).is_(None)))
            for model, phase, gpus, price, start, _ in still_open:
                _add(totals, (model, phase), max((now - start).total_seconds(), 0.0), gpus, price)
        return totals

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

    def lease(self) -> ControllerLease | None:
        with Session(self.engine) as s:
            return s.get(ControllerLease, 1)

    def release_lease(self, holder: str) -> None:
        with Session(self.engine) as s:
            row = s.get(ControllerLease, 1)
            if row is not None and row.holder == holder:
                s.delete(row)
                s.commit()

    def add_usage(self, rows: Iterable[Usage | Mapping[str, Any]]) -> int:
        """Insert usage rows in one statement (executemany): they come in batches of thousands."""
        values = [r.model_dump(exclude={"id"}) if isinstance(r, Usage) else dict(r) for r in rows]
        if values:
            with Session(self.engine) as s:
                s.execute(insert(Usage), values)
                s.commit()
        return len(values)

    def usage(self, *, since: datetime | None = None, until: datetime | None = None) -> list[Usage]:
        with Session(self.engine) as s:
            q = select(Usage).order_by(col(Usage.at), col(Usage.id))
            if since is not None:
                q = q.where(col(Usage.at) >= since)
            if until is not None:
                q = q.where(col(Usage.at) < until)
            return list(s.exec(q))

    def usage_count(self, *, model: str | None = None) -> int:
        with Session(self.engine) as s:
            q = select(func.count()).select_from(Usage)
            if model is not None:
                q = q.where(col(Usage.model) == model)
            return int(s.exec(q).one())
