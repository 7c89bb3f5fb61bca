from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.accounting.costs import Span, columns, summarize, to_csv, totals

T0 = datetime(2026, 11, 26, 22, 0, tzinfo=UTC)


def span(
    model: str,
    phase: str,
    start: datetime,
    hours: float | None,
    *,
    gpus: int = 1,
    price: float = 2.0,
    cluster: str = "c1",
) -> Span:
    end = start + timedelta(hours=hours) if hours is not None else None
    return Span(
        model=model, cluster=cluster, phase=phase, gpus=gpus, hourly_price=price, start=start, end=end
    )


SPANS = [
    span("a", "cold", T0, 0.5),
    span("a", "serving", T0 + timedelta(hours=0.5), 3.5, gpus=2, price=4.0),  # crosses midnight UTC
    span("b", "failed", T0, 0.25, cluster="c2"),
    span("b", "idle", T0 + timedelta(hours=1), None, cluster="c2"),  # still open
]
NOW = T0 + timedelta(hours=5)


def test_by_model_with_phase_split() -> None:
    rows = summarize(SPANS, since=T0, until=NOW, now=NOW, group_by="model")
    a, b = rows
    assert (a["model"], a["dollars"], a["cold_dollars"], a["serving_dollars"]) == ("a", 15.0, 1.0, 14.0)
    assert a["gpu_hours"] == 0.5 + 7.0
    assert (b["dollars"], b["failed_dollars"], b["idle_dollars"]) == (8.5, 0.5, 8.0)  # open: counted to now


def test_by_day_splits_at_utc_midnight() -> None:
    rows = summarize(SPANS, since=T0, until=NOW, now=NOW, group_by="day")
    assert [(r["day"], r["dollars"]) for r in rows] == [
        ("2026-11-26", 1.0 + 6.0 + 0.5 + 2.0),
        ("2026-11-27", 8.0 + 6.0),
    ]


def test_range_clips_and_other_groupings() -> None:
    rows = summarize(SPANS, since=T0 + timedelta(hours=4), until=NOW, now=NOW, group_by="phase")
    assert [(r["phase"], r["dollars"]) for r in rows] == [("idle", 2.0)]
    by_cluster = summarize(SPANS, since=T0, until=NOW, now=NOW, group_by="cluster")
    assert [r["cluster"] for r in by_cluster] == ["c1", "c2"]
    assert summarize(SPANS, since=NOW, until=NOW + timedelta(hours=1), now=NOW, group_by="model") == []
    text = to_csv(rows, columns("phase"))
    assert text.splitlines() == [
        "phase,dollars,gpu_hours,cold_dollars,serving_dollars,idle_dollars,spare_dollars,failed_dollars",
        "idle,2.0,1.0,0.0,0.0,2.0,0.0,0.0",
    ]


def test_totals() -> None:
    t = totals(SPANS, now=NOW)
    assert t[("a", "serving")] == (3.5 * 3600 * 2, 14.0)
    assert t[("b", "idle")] == (4 * 3600, 8.0)
