"""Daily export of usage and cost records to S3, for Athena/QuickSight-style dashboards.

Objects are laid out Hive-style, one folder per UTC day:
    s3://<bucket>/<prefix>/usage/date=YYYY-MM-DD/usage.csv   (per-minute rollups)
    s3://<bucket>/<prefix>/costs/date=YYYY-MM-DD/costs.csv   (cost intervals clipped to the day)
    s3://<bucket>/<prefix>/key_costs/date=YYYY-MM-DD/key_costs.csv   (the day's dollars by API key
        and team, attributed as in attribution.py; they add up to the day's costs.csv)
A usage row is one minute of one model, endpoint, status, stream flag and API key: requests,
tokens, the latency sum and the count per latency bucket (`lat_<bound>`, not cumulative), so a
day is at most a few thousand rows per model whatever the traffic.
Only finished days are exported, and their content is deterministic (sorted rows, fixed
columns), so a re-run writes nothing new: an object whose MD5 (its ETag) already matches is
left alone. Credentials come from the standard AWS chain (boto3).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.accounting.attribution import UNATTRIBUTED, key_costs, rows_of, team_labels
from gateway.accounting.ledger import PHASES
from state import CostInterval, Store
from state.tables import LATENCY_COLUMNS, UsageMinute

log = logging.getLogger(__name__)

USAGE_COLUMNS = [
    "minute",
    "model",
    "path",
    "status",
    "stream",
    "api_key_id",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_sum",
    *LATENCY_COLUMNS,
]
COST_COLUMNS = [
    "model",
    "deployment_id",
    "cluster",
    "provider",
    "phase",
    "gpus",
    "hourly_price",
    "start",
    "end",
    "seconds",
    "gpu_seconds",
    "dollars",
]


KEY_COST_COLUMNS = ["key", "team", "dollars", "gpu_hours", *(f"{p}_dollars" for p in PHASES)]


@dataclass(frozen=True)
class Exported:
    key: str
    rows: int
    written: bool  # False: the object already had this content


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def finished_days(now: datetime, days_back: int) -> list[date]:
    """The last `days_back` UTC days before today's (oldest first)."""
    today = now.astimezone(UTC).date()
    return [today - timedelta(days=n) for n in range(days_back, 0, -1)]


def _csv(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def usage_rows(rows: Iterable[UsageMinute]) -> list[dict[str, Any]]:
    """The CSV rows of rollups, in key order; several rows of one key (two gateways flushed the
    same minute) become one."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for u in rows:
        key = (u.minute, u.model, u.path, u.status, u.stream, u.api_key_id or "")
        row = merged.get(key)
        if row is None:
            merged[key] = {
                "minute": u.minute.isoformat(),
                "model": u.model,
                "path": u.path,
                "status": u.status,
                "stream": str(u.stream).lower(),
                "api_key_id": u.api_key_id or "",
                **{c: getattr(u, c) for c in USAGE_COLUMNS[6:]},
            }
        else:
            for c in USAGE_COLUMNS[6:]:
                row[c] += getattr(u, c)
    for row in merged.values():
        row["latency_ms_sum"] = round(row["latency_ms_sum"], 3)
    return [merged[k] for k in sorted(merged)]


def cost_rows(intervals: Iterable[CostInterval], day: date) -> list[dict[str, Any]]:
    """Each interval's part within the day (open intervals up to the day's end)."""
    day_start, day_end = day_bounds(day)
    out = []
    for i in intervals:
        start, end = max(i.started_at, day_start), min(i.ended_at or day_end, day_end)
        if end <= start:
            continue
        seconds = (end - start).total_seconds()
        out.append(
            {
                "model": i.model,
                "deployment_id": i.deployment_id,
                "cluster": i.cluster or "",
                "provider": i.provider,
                "phase": i.phase,
                "gpus": i.gpus,
                "hourly_price": i.hourly_price,
                "start": start.isoformat(),
                "end": end.isoformat(),
                "seconds": seconds,
                "gpu_seconds": seconds * i.gpus,
                "dollars": round(seconds / 3600 * i.hourly_price, 6),
            }
        )
    return sorted(out, key=lambda r: (r["start"], r["deployment_id"], r["phase"]))


def key_cost_rows(store: Store, day: date) -> list[dict[str, Any]]:
    """The day's dollars by API key, with each key's team (`admin` and `-` are their own)."""
    start, end = day_bounds(day)
    teams = team_labels(store)
    rows = rows_of(key_costs(store, since=start, until=end, now=end), "key", {})
    return [{**row, "team": teams.get(row["key"]) or UNATTRIBUTED} for row in rows]


def _put_if_changed(s3: Any, bucket: str, key: str, body: bytes) -> bool:
    md5 = hashlib.md5(body).hexdigest()
    try:
        if s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"') == md5:
            return False
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/csv")
    return True


def export_day(store: Store, s3: Any, *, bucket: str, prefix: str, day: date) -> list[Exported]:
    start, end = day_bounds(day)
    usage = usage_rows(store.usage_minutes(since=start, until=end))
    costs = cost_rows(store.intervals(since=start, until=end), day)
    by_key = key_cost_rows(store, day)
    base = prefix.strip("/")
    results = []
    for kind, columns, rows in (
        ("usage", USAGE_COLUMNS, usage),
        ("costs", COST_COLUMNS, costs),
        ("key_costs", KEY_COST_COLUMNS, by_key),
    ):
        key = (
            f"{base}/{kind}/date={day.isoformat()}/{kind}.csv"
            if base
            else f"{kind}/date={day.isoformat()}/{kind}.csv"
        )
        written = _put_if_changed(s3, bucket, key, _csv(columns, rows))
        results.append(Exported(key=key, rows=len(rows), written=written))
        log.info(
            "export %s: s3://%s/%s (%d rows)", "written" if written else "unchanged", bucket, key, len(rows)
        )
    return results


def export_days(store: Store, s3: Any, *, bucket: str, prefix: str, days: Iterable[date]) -> list[Exported]:
    return [e for day in days for e in export_day(store, s3, bucket=bucket, prefix=prefix, day=day)]


def s3_client() -> Any:
    import boto3

    return boto3.client("s3")
