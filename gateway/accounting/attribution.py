"""Cost by key: the ledger's dollars attributed to the client API keys that caused them.

- cold and failed time (a start) belongs to whoever started the deployment: the key whose
  request started it, or `admin` for admin loads and pre-warms (`Deployment.started_by`);
- serving and idle time of a model on a UTC day is split in proportion to the tokens each key
  used on that model that day (by requests where no tokens were reported). The whole day's
  usage is the weight whatever range is asked for, so the figures of a day never change with
  the report's range, and days add up.

Time nobody can be named for (a model without usage that day, engines adopted or started
before keys existed, open access) is `-`. Every dollar lands in exactly one group, so the
groups add up to the ledger's total.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from gateway.accounting.costs import Span, day_bounds, spans_of
from gateway.accounting.ledger import PHASES
from state import Store

UNATTRIBUTED = "-"
# Who admin loads and scheduled pre-warms are attributed to (a request's start: its API key id).
ADMIN = "admin"
# (model, UTC day) -> key id -> weight (tokens, or requests).
Weights = dict[tuple[str, date], dict[str, float]]
# group -> [GPU-seconds, dollars of each phase in PHASES order]
_Acc = defaultdict[str, list[float]]


def weights_of(rows_by_day: Mapping[date, Iterable[Mapping[str, Any]]]) -> Weights:
    """Weights from usage totals grouped by model and api_key_id, per day."""
    out: Weights = {}
    for day, rows in rows_by_day.items():
        tokens: dict[str, dict[str, float]] = defaultdict(dict)
        requests: dict[str, dict[str, float]] = defaultdict(dict)
        for r in rows:
            key = r["api_key_id"] or UNATTRIBUTED
            t = tokens[r["model"]]
            t[key] = t.get(key, 0.0) + float((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0))
            q = requests[r["model"]]
            q[key] = q.get(key, 0.0) + float(r["requests"] or 0)
        for model in requests:
            chosen = tokens[model] if sum(tokens[model].values()) > 0 else requests[model]
            out[(model, day)] = {k: v for k, v in chosen.items() if v > 0}
    return out


def attribute(
    spans: Iterable[Span],
    *,
    started_by: Mapping[str, str | None],
    weights: Weights,
    since: datetime,
    until: datetime,
    now: datetime,
) -> dict[str, list[float]]:
    """Per key id: [GPU-seconds, dollars of each phase] of the time in [since, until)."""
    acc: _Acc = defaultdict(lambda: [0.0] * (1 + len(PHASES)))
    slot = {phase: 1 + i for i, phase in enumerate(PHASES)}
    for span in spans:
        start, end = max(span.start, since), min(span.end or now, until, now)
        for a, b in day_bounds(start, end) if end > start else ():
            seconds = (b - a).total_seconds()
            dollars = seconds / 3600 * span.hourly_price
            for key, share in _shares(span, a.date(), started_by, weights):
                row = acc[key]
                row[0] += seconds * span.gpus * share
                row[slot[span.phase]] += dollars * share
    return dict(acc)


def _shares(
    span: Span, day: date, started_by: Mapping[str, str | None], weights: Weights
) -> list[tuple[str, float]]:
    if span.phase in ("cold", "failed"):
        return [(started_by.get(span.deployment_id) or UNATTRIBUTED, 1.0)]
    used = weights.get((span.model, day))
    total = sum(used.values()) if used else 0.0
    if not used or total <= 0:
        return [(UNATTRIBUTED, 1.0)]
    return [(key, w / total) for key, w in used.items()]


def rows_of(
    acc: Mapping[str, list[float]], group_by: Literal["key", "team"], team_of: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Report rows (like `costs.summarize`'s), by key id or by the keys' team label (`-` for
    keys without one)."""
    groups: defaultdict[str, list[float]] = defaultdict(lambda: [0.0] * (1 + len(PHASES)))
    for key, values in acc.items():
        group = key if group_by == "key" else team_of.get(key) or UNATTRIBUTED
        for i, v in enumerate(values):
            groups[group][i] += v
    return [
        {
            group_by: group,
            "dollars": round(sum(values[1:]), 6),
            "gpu_hours": round(values[0] / 3600, 6),
            **{f"{phase}_dollars": round(values[1 + i], 6) for i, phase in enumerate(PHASES)},
        }
        for group, values in sorted(groups.items())
    ]


# -- reading the store (in a thread: a handful of aggregate queries) ---------------------------


def key_costs(store: Store, *, since: datetime, until: datetime, now: datetime) -> dict[str, list[float]]:
    """`attribute` over the store's intervals, starters and usage of [since, until)."""
    intervals = store.intervals(since=since, until=until)
    spans = spans_of(intervals)
    started_by = store.started_by({i.deployment_id for i in intervals})
    days = _shared_days(spans, since=since, until=until, now=now)
    rows = {
        day: store.usage_totals(
            since=datetime(day.year, day.month, day.day, tzinfo=UTC),
            until=datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1),
            by=("model", "api_key_id"),
        )
        for day in days
    }
    return attribute(
        spans, started_by=started_by, weights=weights_of(rows), since=since, until=until, now=now
    )


def team_labels(store: Store) -> dict[str, str]:
    """Key id -> team; `admin` is its own team."""
    out = {k.id: k.team for k in store.api_keys()}
    out[ADMIN] = ADMIN
    return out


def month_start(now: datetime) -> datetime:
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def month_spend(store: Store, now: datetime) -> dict[str, float]:
    """Dollars attributed to each key since the start of this UTC month (for budgets)."""
    acc = key_costs(store, since=month_start(now), until=now, now=now)
    return {key: sum(values[1:]) for key, values in acc.items()}


def team_month_costs(store: Store, now: datetime) -> dict[str, float]:
    """Dollars attributed to each team (keys' labels, `admin`, `-`) this UTC month."""
    acc = key_costs(store, since=month_start(now), until=now, now=now)
    return {row["team"]: row["dollars"] for row in rows_of(acc, "team", team_labels(store))}


def _shared_days(spans: Iterable[Span], *, since: datetime, until: datetime, now: datetime) -> list[date]:
    """The UTC days on which some serving or idle time is split by usage: only those need a
    usage query (a range since 2000 must not cost one query per calendar day)."""
    days: set[date] = set()
    for span in spans:
        if span.phase in ("cold", "failed"):
            continue
        start, end = max(span.start, since), min(span.end or now, until, now)
        if end > start:
            days.update(a.date() for a, _ in day_bounds(start, end))
    return sorted(days)
