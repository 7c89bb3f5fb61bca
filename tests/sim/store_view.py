"""A read-only view of the gateways' database for the invariants, on its own connection.

Plain sqlite3 rather than a second `Store`: the checks run after every step and read the whole
deployment and interval tables, and SQLAlchemy's ORM costs ~1 ms a query where sqlite3 costs
~30 µs. It reads the tables `state/tables.py` defines and converts times to virtual seconds.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class Row:
    id: str
    model: str
    state: str
    cluster: str | None


@dataclass(frozen=True)
class Interval:
    deployment_id: str
    cluster: str | None
    phase: str
    start: float
    end: float | None


@dataclass(frozen=True)
class EventRow:
    id: int
    at: float
    kind: str
    model: str | None
    deployment_id: str | None
    message: str


TERMINAL = ("stopped", "failed")


class StoreView:
    def __init__(self, path: Path, epoch: datetime) -> None:
        self.path = path
        self.epoch = epoch
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None and self.path.exists():
            self._db = sqlite3.connect(self.path, isolation_level=None)
        return self._db

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        db = self._conn()
        if db is None:
            return []
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:  # tables not created yet
            if "no such table" in str(exc):
                return []
            raise

    def seconds(self, raw: object) -> float:
        at = datetime.fromisoformat(str(raw))
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        return (at - self.epoch).total_seconds()

    def lease(self) -> tuple[str, float] | None:
        rows = self._query("SELECT holder, expires_at FROM controller_lease WHERE id = 1")
        return (str(rows[0][0]), self.seconds(rows[0][1])) if rows else None

    def rows(self) -> list[Row]:
        return [
            Row(str(i), str(m), str(s), c if c is None else str(c))
            for i, m, s, c in self._query("SELECT id, model, state, cluster FROM deployments ORDER BY rowid")
        ]

    def intervals(self) -> list[Interval]:
        return [
            Interval(
                str(d),
                c if c is None else str(c),
                str(p),
                self.seconds(s),
                None if e is None else self.seconds(e),
            )
            for d, c, p, s, e in self._query(
                "SELECT deployment_id, cluster, phase, started_at, ended_at FROM cost_intervals ORDER BY id"
            )
        ]

    def events(self, after_id: int = 0) -> list[EventRow]:
        return [
            EventRow(int(i), self.seconds(at), str(k), m, d, str(msg))
            for i, at, k, m, d, msg in self._query(
                f"SELECT id, at, kind, model, deployment_id, message FROM events WHERE id > {int(after_id)} ORDER BY id"
            )
        ]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
