"""Cost reports from ledger intervals: pure functions (no store, no clock of their own)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from gateway.accounting.ledger import PHASES
from state import CostInterval

SpanGroup = Literal["model", "day", "cluster", "phase"]  # read off the intervals alone
GroupBy = Literal["model", "day", "cluster", "phase", "key", "team"]  # key, team: see attribution.py


@dataclass(frozen=True)
class Span:
    model: str
    cluster: str | None
    phase: str
    gpus: int
    hourly_price: float
    start: datetime
    end: datetime | None  # None: still open
    deployment_id: str = ""


def day_bounds(start: datetime, end: datetime) -> Iterable[tuple[datetime, datetime]]:
    """Split [start, end) at UTC midnights."""
    cursor = start
    while cursor < end:
        midnight = datetime(cursor.year, cursor.month, cursor.day, tzinfo=UTC) + timedelta(days=1)
        stop = min(midnight, end)
        yield cursor, stop
        cursor = stop


def summarize(
    spans: Iterable[Span], *, since: datetime, until: datetime, now: datetime, group_by: SpanGroup
) -> list[dict[str, Any]]:
    """Dollars and GPU-hours per group, with the dollars of each phase, for time in [since, until).
    Open intervals count up to `now`; days are UTC days."""
    dollars: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
    gpu_seconds: defaultdict[str, float] = defaultdict(float)
    for span in spans:
        start, end = max(span.start, since), min(span.end or now, until, now)
        if end <= start:
            continue
        for a, b in day_bounds(start, end) if group_by == "day" else [(start, end)]:
            key = {
                "model": span.model,
                "day": a.date().isoformat(),
                "cluster": span.cluster or "-",
                "phase": span.phase,
            }[group_by]
            seconds = (b - a).total_seconds()
            dollars[key][span.phase] += seconds / 3600 * span.hourly_price
            gpu_seconds[key] += seconds * span.gpus
    rows = []
    for key in sorted(dollars):
        by_phase = dollars[key]
        rows.append(
            {
                group_by: key,
                "dollars": round(sum(by_phase.values()), 6),
                "gpu_hours": round(gpu_seconds[key] / 3600, 6),
                **{f"{phase}_dollars": round(by_phase.get(phase, 0.0), 6) for phase in PHASES},
            }
        )
    return rows


def totals(spans: Iterable[Span], *, now: datetime) -> dict[tuple[str, str], tuple[float, float]]:
    """(GPU-seconds, dollars) by (model, phase) over all time, open intervals up to `now`."""
    out: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for span in spans:
        seconds = max(((span.end or now) - span.start).total_seconds(), 0.0)
        acc = out[(span.model, span.phase)]
        acc[0] += seconds * span.gpus
        acc[1] += seconds / 3600 * span.hourly_price
    return {key: (gpu_s, dollars) for key, (gpu_s, dollars) in out.items()}


def spans_of(intervals: Iterable[CostInterval]) -> list[Span]:
    return [
        Span(
            model=i.model,
            cluster=i.cluster,
            phase=i.phase,
            gpus=i.gpus,
            hourly_price=i.hourly_price,
            start=i.started_at,
            end=i.ended_at,
            deployment_id=i.deployment_id,
        )
        for i in intervals
    ]


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def columns(group_by: GroupBy) -> list[str]:
    return [group_by, "dollars", "gpu_hours", *(f"{p}_dollars" for p in PHASES)]
