"""S3 export against moto's in-process S3 (mock_aws): keys, contents, idempotence."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from gateway.accounting.export import COST_COLUMNS, USAGE_COLUMNS, export_day, finished_days
from state import CostInterval, Store, Usage

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
    st.create_all()
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
    st.add_usage(
        [
            Usage(
                at=D0 + timedelta(hours=h),
                model="m-d1",
                deployment_id="d1",
                path="/v1/chat/completions",
                status=200,
                stream=h % 2 == 0,
                latency_ms=12.5,
                prompt_tokens=10,
                completion_tokens=h,
            )
            for h in (3, 1, 2)
        ]
        + [
            Usage(
                at=D0 - timedelta(minutes=1), model="m-d1", path="/v1/completions", status=400, latency_ms=1.0
            )
        ]
    )
    return st


def read_csv(s3: object, key: str) -> list[dict[str, str]]:
    body = s3.get_object(Bucket="costs", Key=key)["Body"].read().decode()  # type: ignore[attr-defined]
    return list(csv.DictReader(io.StringIO(body)))


def test_export_writes_the_day_under_hive_keys_and_reads_back_equal(s3: object, store: Store) -> None:
    results = export_day(store, s3, bucket="costs", prefix="team/llmgw/", day=DAY)
    assert [(r.key, r.rows, r.written) for r in results] == [
        ("team/llmgw/usage/date=2026-11-26/usage.csv", 3, True),
        ("team/llmgw/costs/date=2026-11-26/costs.csv", 3, True),
    ]
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="costs")["Contents"])  # type: ignore[attr-defined]
    assert listed == [
        "team/llmgw/costs/date=2026-11-26/costs.csv",
        "team/llmgw/usage/date=2026-11-26/usage.csv",
    ]
    usage = read_csv(s3, results[0].key)
    assert list(usage[0]) == USAGE_COLUMNS
    assert [int(u["completion_tokens"]) for u in usage] == [1, 2, 3]  # sorted by time
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


def test_a_second_run_changes_nothing(s3: object, store: Store) -> None:
    first = export_day(store, s3, bucket="costs", prefix="p", day=DAY)
    stamps = {
        o["Key"]: (o["ETag"], o["LastModified"]) for o in s3.list_objects_v2(Bucket="costs")["Contents"]
    }  # type: ignore[attr-defined]
    second = export_day(store, s3, bucket="costs", prefix="p", day=DAY)
    assert [r.written for r in first] == [True, True] and [r.written for r in second] == [False, False]
    again = {o["Key"]: (o["ETag"], o["LastModified"]) for o in s3.list_objects_v2(Bucket="costs")["Contents"]}  # type: ignore[attr-defined]
    assert again == stamps


def test_finished_days() -> None:
    assert finished_days(datetime(2026, 11, 27, 0, 30, tzinfo=UTC), 3) == [
        date(2026, 11, 24),
        date(2026, 11, 25),
        date(2026, 11, 26),
    ]
