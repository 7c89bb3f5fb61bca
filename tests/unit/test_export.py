"""S3 export against moto's in-process S3 (mock_aws): keys, contents, idempotence."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from sqlalchemy import insert

from gateway.accounting.export import (
    COST_COLUMNS,
    KEY_COST_COLUMNS,
    USAGE_COLUMNS,
    export_day,
    finished_days,
)
from state import CostInterval, Store
from state.tables import LATENCY_COLUMNS, UsageMinute

DAY = date(2026, 11, 26)
D0 = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="costs")
        yield client


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    st.upgrade()
    # An interval from the day before into DAY, one inside DAY, one still open, one on the next day.
    for dep, phase, start, end in [
        ("d1", "serving", D0 - timedelta(hours=2), D0 + timedelta(hours=1)),
        ("d1", "idle", D0 + timedelta(hours=1), D0 + timedelta(hours=1, minutes=30)),
        ("d2", "cold", D0 + timedelta(hours=23), None),
        ("d3", "failed", D0 + timedelta(days=1, hours=1), D0 + timedelta(days=1, hours=2)),
    ]:
        st.open_interval(
            CostInterval(
                deployment_id=dep,
                model=f"m-{dep}",
                cluster=f"c-{dep}",
                provider="skypilot",
                phase=phase,
                gpus=2,
                hourly_price=3.6,
                started_at=start,
            )
        )
        if end is not None:
            st.close_interval(dep, at=end)
    # Usage: three minutes of one model, a second row for one key (as a second gateway writes
    # it), and a minute of the day before.
    rows = [minute(D0 + timedelta(hours=h), completion=h, stream=h % 2 == 0) for h in (3, 1, 2)]
    rows.append(minute(D0 + timedelta(hours=1), completion=5, stream=False))
    rows.append(minute(D0 - timedelta(minutes=1), completion=0, stream=False, status=400))
    for row in rows:
        st.add_usage_minutes([row])  # one by one: the duplicate key is added to its row
    st.add_usage_minutes([minute(D0 + timedelta(hours=2), completion=7, stream=True, api_key_id="k1")])
    with st.engine.begin() as conn:  # a second row for a key: two gateways raced on that minute
        conn.execute(insert(UsageMinute), [minute(D0 + timedelta(hours=3), completion=4, stream=False)])
    return st


def minute(
    at: datetime, *, completion: int, stream: bool, status: int = 200, api_key_id: str | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "minute": at,
        "model": "m-d1",
        "path": "/v1/chat/completions",
        "status": status,
        "stream": stream,
        "api_key_id": api_key_id,
        "requests": 2,
        "prompt_tokens": 10,
        "completion_tokens": completion,
        "latency_ms_sum": 25.0,
    }
    row.update({c: 0 for c in LATENCY_COLUMNS})
    row["lat_25ms"] = 2
    return row


def read_csv(s3: object, key: str) -> list[dict[str, str]]:
    body = s3.get_object(Bucket="costs", Key=key)["Body"].read().decode()  # type: ignore[attr-defined]
    return list(csv.DictReader(io.StringIO(body)))


def test_export_writes_the_day_under_hive_keys_and_reads_back_equal(s3: object, store: Store) -> None:
    results = export_day(store, s3, bucket="costs", prefix="team/llmgw/", day=DAY)
    assert [(r.key, r.rows, r.written) for r in results] == [
        ("team/llmgw/usage/date=2026-11-26/usage.csv", 4, True),
        ("team/llmgw/costs/date=2026-11-26/costs.csv", 3, True),
        ("team/llmgw/key_costs/date=2026-11-26/key_costs.csv", 2, True),
    ]
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="costs")["Contents"])  # type: ignore[attr-defined]
    assert listed == [
        "team/llmgw/costs/date=2026-11-26/costs.csv",
        "team/llmgw/key_costs/date=2026-11-26/key_costs.csv",
        "team/llmgw/usage/date=2026-11-26/usage.csv",
    ]
    usage = read_csv(s3, results[0].key)
    assert list(usage[0]) == USAGE_COLUMNS
    # In minute order; 01:00 was added to in the store, 03:00 is two rows of one key merged; a key
    # with an API key is a row of its own.
    assert [(u["minute"][11:16], int(u["completion_tokens"]), u["api_key_id"]) for u in usage] == [
        ("01:00", 6, ""),
        ("02:00", 2, ""),
        ("02:00", 7, "k1"),
        ("03:00", 7, ""),
    ]
    assert [int(u["requests"]) for u in usage] == [4, 2, 2, 4]
    assert [int(u["lat_25ms"]) for u in usage] == [4, 2, 2, 4]
    assert {u["stream"] for u in usage} == {"true", "false"}
    costs = read_csv(s3, results[1].key)
    assert list(costs[0]) == COST_COLUMNS
    # Clipped to the day: 1 h of the serving interval, 30 min idle, the open one's last hour.
    assert [(c["deployment_id"], c["phase"], float(c["seconds"])) for c in costs] == [
        ("d1", "serving", 3600.0),
        ("d1", "idle", 1800.0),
        ("d2", "cold", 3600.0),
    ]
    assert [float(c["dollars"]) for c in costs] == [3.6, 1.8, 3.6]
    assert all(float(c["gpu_seconds"]) == 2 * float(c["seconds"]) for c in costs)
    # No deployment row names a starter (d2's cold hour is `-`); m-d1's serving and idle time is
    # split by the day's tokens: 17 of k1 (a key without a row: no team), 65 without a key.
    by_key = read_csv(s3, results[2].key)
    assert list(by_key[0]) == KEY_COST_COLUMNS
    assert [(k["key"], k["team"]) for k in by_key] == [("-", "-"), ("k1", "-")]
    assert float(by_key[1]["dollars"]) == pytest.approx(5.4 * 17 / 82, abs=1e-6)
    assert sum(float(k["dollars"]) for k in by_key) == pytest.approx(9.0)


def test_a_second_run_changes_nothing(s3: object, store: Store) -> None:
    first = export_day(store, s3, bucket="costs", prefix="p", day=DAY)
    stamps = {
        o["Key"]: (o["ETag"], o["LastModified"]) for o in s3.list_objects_v2(Bucket="costs")["Contents"]
    }  # type: ignore[attr-defined]
    second = export_day(store, s3, bucket="costs", prefix="p", day=DAY)
    assert [r.written for r in first] == [True] * 3 and [r.written for r in second] == [False] * 3
    again = {o["Key"]: (o["ETag"], o["LastModified"]) for o in s3.list_objects_v2(Bucket="costs")["Contents"]}  # type: ignore[attr-defined]
    assert again == stamps


def test_finished_days() -> None:
    assert finished_days(datetime(2026, 11, 27, 0, 30, tzinfo=UTC), 3) == [
        date(2026, 11, 24),
        date(2026, 11, 25),
        date(2026, 11, 26),
    ]
