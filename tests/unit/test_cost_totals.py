"""Cost totals for /metrics are summed by the database: the same figures as the ledger's
intervals summed in Python, to the microsecond, open intervals up to now."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from state import CostInterval, Store
from state.store import _totals_in_python

T0 = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)


def test_database_sums_equal_the_python_sums(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    rnd = random.Random(7)
    for d in range(40):
        at = T0 + timedelta(seconds=rnd.uniform(0, 3600))
        for phase in ("cold", "serving", "idle", "serving"):
            store.open_interval(
                CostInterval(
                    deployment_id=f"d{d}",
                    model=f"m{d % 3}",
                    provider="fake",
                    phase=phase,
                    gpus=rnd.choice([1, 2, 8]),
                    hourly_price=rnd.uniform(0.5, 40),
                    started_at=at,
                )
            )
            at += timedelta(seconds=rnd.uniform(0, 900), microseconds=rnd.randrange(1_000_000))
        if d % 2:  # half of them stopped, half still open
            store.close_interval(f"d{d}", at=at)
    now = T0 + timedelta(hours=3, microseconds=123)
    expected = _totals_in_python(store.intervals(), now)
    got = store.cost_totals(now)
    assert got.keys() == expected.keys() and len(got) == 3 * 3
    for key, (gpu_s, dollars) in expected.items():
        assert got[key][0] == pytest.approx(gpu_s, abs=1e-6)
        assert got[key][1] == pytest.approx(dollars, abs=1e-9)
    store.close()
