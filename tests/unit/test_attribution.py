"""Cost attribution by key: pure functions over spans, starters and the days' usage."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.accounting.attribution import UNATTRIBUTED, attribute, key_costs, rows_of, weights_of
from gateway.accounting.costs import Span
from state import CostInterval, Store

D0 = datetime(2026, 11, 26, tzinfo=UTC)
DAY0, DAY1 = date(2026, 11, 26), date(2026, 11, 27)


def span(phase: str, start: datetime, hours: float, deployment: str = "d1", model: str = "m") -> Span:
    return Span(
        model=model,
        cluster=None,
        phase=phase,
        gpus=2,
        hourly_price=10.0,
        start=start,
        end=start + timedelta(hours=hours),
        deployment_id=deployment,
    )


def usage(model: str, key: str | None, tokens: int, requests: int = 1) -> dict[str, object]:
    return {
        "model": model,
        "api_key_id": key,
        "prompt_tokens": tokens,
        "completion_tokens": 0,
        "requests": requests,
    }


def test_a_start_is_the_starters_and_ready_time_is_split_by_each_days_tokens() -> None:
    spans = [
        span("cold", D0 + timedelta(hours=22), 1),
        span("serving", D0 + timedelta(hours=23), 2),  # one hour on each day
        span("failed", D0, 0.5, deployment="d2"),  # nobody is named for d2
    ]
    weights = weights_of(
        {
            DAY0: [usage("m", "a", 30), usage("m", "b", 10), usage("other", "c", 99)],
            DAY1: [usage("m", "b", 5), usage("m", None, 0, requests=3)],  # tokens win over requests
        }
    )
    acc = attribute(
        spans,
        started_by={"d1": "a"},
        weights=weights,
        since=D0,
        until=D0 + timedelta(days=2),
        now=D0 + timedelta(days=3),
    )
    dollars = {key: sum(v[1:]) for key, v in acc.items()}
    assert dollars == pytest.approx({"a": 10 + 7.5, "b": 2.5 + 10, "-": 5.0})
    assert sum(dollars.values()) == pytest.approx(10 + 20 + 5)  # every dollar once
    assert acc["a"][0] == pytest.approx(3600 * 2 + 3600 * 2 * 0.75)  # GPU-seconds follow the dollars


def test_requests_weigh_where_no_tokens_were_reported_and_teams_group_keys() -> None:
    weights = weights_of({DAY0: [usage("m", "a", 0, requests=1), usage("m", "b", 0, requests=3)]})
    acc = attribute(
        [span("idle", D0, 1)],
        started_by={},
        weights=weights,
        since=D0,
        until=D0 + timedelta(days=1),
        now=D0 + timedelta(days=1),
    )
    rows = rows_of(acc, "team", {"a": "x", "b": "x"})
    assert [(r["team"], r["dollars"], r["idle_dollars"]) for r in rows] == [("x", 10.0, 10.0)]
    by_key = {r["key"]: r["dollars"] for r in rows_of(acc, "key", {})}
    assert by_key == {"a": 2.5, "b": 7.5}


def test_a_range_since_2000_queries_usage_only_for_days_with_ready_time(tmp_path: Path) -> None:
    """Found by the schema fuzzer: `/admin/costs?group_by=key&since=2000-01-01` made one usage
    query per calendar day (9,000 of them) and timed out."""

    class CountingStore(Store):
        usage_queries = 0

        def usage_totals(self, **kwargs: Any) -> Any:
            CountingStore.usage_queries += 1
            return super().usage_totals(**kwargs)

    store = CountingStore(f"sqlite:///{tmp_path / 'gw.db'}")
    store.upgrade()
    for phase, start in (
        ("cold", D0),
        ("idle", D0 + timedelta(hours=1)),
    ):  # open_interval closes the one before
        store.open_interval(
            CostInterval(
                deployment_id="d1",
                model="m",
                provider="fake",
                phase=phase,
                gpus=1,
                hourly_price=1.0,
                started_at=start,
                checked_at=start,
            )
        )
    store.close_interval("d1", at=D0 + timedelta(hours=31))
    now = D0 + timedelta(days=3)
    wide = key_costs(store, since=datetime(2000, 1, 1, tzinfo=UTC), until=now, now=now)
    assert CountingStore.usage_queries == 2  # the two days the idle time touches
    assert wide == key_costs(store, since=D0, until=now, now=now)
    assert sum(wide[UNATTRIBUTED][1:]) == pytest.approx(31.0)  # no usage: nobody to name
    store.close()
