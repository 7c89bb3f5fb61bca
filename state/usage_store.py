"""Usage in the store: per-minute rollups (the durable record) and optional raw rows.

A mixin of `Store` (it uses `self.engine`). Writes are meant for the database writer's thread:
they take plain values, never ORM objects that the loop could still hold.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, delete, func, insert, update
from sqlmodel import Session, col, select

from state.tables import USAGE_KEY_COLUMNS, USAGE_SUM_COLUMNS, Usage, UsageMinute

# (minute, model, path, status, stream, api_key_id): what identifies a rollup row.
UsageKey = tuple[datetime, str, str, int, bool, str | None]
GROUPABLE = ("model", "path", "status", "stream", "api_key_id")

_T = UsageMinute.__table__  # type: ignore[attr-defined]


def key_of(row: Mapping[str, Any]) -> UsageKey:
    return (row["minute"], row["model"], row["path"], row["status"], row["stream"], row["api_key_id"])


def _key_params(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {f"k_{c}": row[c] for c in USAGE_KEY_COLUMNS}
    out.update({f"d_{c}": row[c] for c in USAGE_SUM_COLUMNS})
    return out


# Add a row's sums to the row with its key (api_key_id may be NULL: IS NOT DISTINCT FROM).
_ADD = (
    update(_T)
    .where(
        *(_T.c[c] == bindparam(f"k_{c}") for c in USAGE_KEY_COLUMNS if c != "api_key_id"),
        _T.c.api_key_id.is_not_distinct_from(bindparam("k_api_key_id")),
    )
    .values({c: _T.c[c] + bindparam(f"d_{c}") for c in USAGE_SUM_COLUMNS})
)


class _StaleKeys(Exception):
    pass


class UsageStore:
    engine: Engine

    # -- per-minute rollups ---------------------------------------------------------------

    def add_usage_minutes(
        self, rows: Sequence[Mapping[str, Any]], *, known: Collection[UsageKey] = ()
    ) -> list[UsageKey]:
        """Add rollup rows (key columns and sums) in one transaction. Rows whose key is in
        `known` (written before by this process) are added to theirs in one statement; the
        others are added one by one, and inserted when no row has their key yet. Returns the
        keys written (all of them)."""
        if not rows:
            return []
        try:
            self._add_usage_minutes(rows, known)
        except _StaleKeys:  # a known row is gone (pruned, another database): the slow way
            self._add_usage_minutes(rows, ())
        return [key_of(r) for r in rows]

    def _add_usage_minutes(self, rows: Sequence[Mapping[str, Any]], known: Collection[UsageKey]) -> None:
        seen = [r for r in rows if key_of(r) in known]
        new = [r for r in rows if key_of(r) not in known]
        with self.engine.begin() as conn:
            if seen and conn.execute(_ADD, [_key_params(r) for r in seen]).rowcount != len(seen):
                raise _StaleKeys  # rolls the transaction back
            missing = [r for r in new if conn.execute(_ADD, _key_params(r)).rowcount == 0]
            if missing:
                conn.execute(insert(_T), [dict(r) for r in missing])

    def usage_minutes(
        self, *, since: datetime | None = None, until: datetime | None = None, model: str | None = None
    ) -> list[UsageMinute]:
        """Rollup rows with `since <= minute < until`, in key order."""
        with Session(self.engine) as s:
            q = select(UsageMinute).order_by(*(col(getattr(UsageMinute, c)) for c in USAGE_KEY_COLUMNS))
            if since is not None:
                q = q.where(col(UsageMinute.minute) >= since)
            if until is not None:
                q = q.where(col(UsageMinute.minute) < until)
            if model is not None:
                q = q.where(col(UsageMinute.model) == model)
            return list(s.exec(q))

    def usage_totals(
        self, *, since: datetime | None = None, until: datetime | None = None, by: Sequence[str] = ("model",)
    ) -> list[dict[str, Any]]:
        """Sums of the rollups over [since, until), grouped by some of `GROUPABLE`."""
        if not set(by) <= set(GROUPABLE):
            raise ValueError(f"usage can be grouped by {', '.join(GROUPABLE)}")
        groups = [_T.c[c] for c in by]
        q = select(*groups, *(func.sum(_T.c[c]).label(c) for c in USAGE_SUM_COLUMNS)).group_by(*groups)
        if since is not None:
            q = q.where(_T.c.minute >= since)
        if until is not None:
            q = q.where(_T.c.minute < until)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q.order_by(*groups))]

    def usage_count(self, *, model: str | None = None) -> int:
        """Requests recorded (summed over the rollups)."""
        q = select(func.coalesce(func.sum(_T.c.requests), 0))
        if model is not None:
            q = q.where(_T.c.model == model)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def usage_minute_rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_T)).scalar_one())

    # -- raw rows (optional) --------------------------------------------------------------

    def add_usage(self, rows: Iterable[Usage | Mapping[str, Any]]) -> int:
        """Insert raw usage rows in one statement (executemany)."""
        values = [r.model_dump(exclude={"id"}) if isinstance(r, Usage) else dict(r) for r in rows]
        if values:
            with self.engine.begin() as conn:
                conn.execute(insert(Usage), values)
        return len(values)

    def usage(self, *, since: datetime | None = None, until: datetime | None = None) -> list[Usage]:
        with Session(self.engine) as s:
            q = select(Usage).order_by(col(Usage.at), col(Usage.id))
            if since is not None:
                q = q.where(col(Usage.at) >= since)
            if until is not None:
                q = q.where(col(Usage.at) < until)
            return list(s.exec(q))

    # -- retention ------------------------------------------------------------------------

    def prune_usage(self, before: datetime, *, limit: int = 10_000) -> int:
        """Delete up to `limit` raw rows older than `before` (one short transaction; call again
        while it returns `limit`)."""
        ids = select(col(Usage.id)).where(col(Usage.at) < before).limit(limit)
        with self.engine.begin() as conn:
            return int(conn.execute(delete(Usage).where(col(Usage.id).in_(ids))).rowcount)

    def prune_usage_minutes(self, before: datetime, *, limit: int = 10_000) -> int:
        """Delete up to `limit` rollup rows of minutes before `before` (like `prune_usage`)."""
        ids = select(_T.c.id).where(_T.c.minute < before).limit(limit)
        with self.engine.begin() as conn:
            return int(conn.execute(delete(_T).where(_T.c.id.in_(ids))).rowcount)
