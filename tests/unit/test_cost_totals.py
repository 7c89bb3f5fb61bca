"""`Store.cost_totals` (what /metrics reads) against the pure computation over every interval
in accounting/costs.py, after random ledger histories written through the store's own methods."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlmodel import Session, select

from gateway.accounting.costs import spans_of, totals
from state import CostInterval, CostTotalRow, Store
from state.store import IntervalChange

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
PHASES = ("cold", "serving", "idle")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    st = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    st.create_all()
    return st


def interval(dep: str, model: str, phase: str, at: datetime, rng: random.Random) -> CostInterval:
    return CostInterval(
        deployment_id=dep,
        model=model,
        provider="fake",
        phase=phase,
        gpus=rng.choice([1, 2, 8]),
        hourly_price=rng.choice([0.0, 1.1, 3.6, 32.77]),
        started_at=at,
    )


def random_history(store: Store, rng: random.Random, steps: int) -> datetime:
    """What a ledger does: open, flip phases (one transaction for several deployments), relabel
    a 0-second interval, close (a failed launch relabels cold to failed), discard."""
    now, live = T0, {}  # deployment id -> model
    store.open_interval(interval("pinned", "b", "idle", now, rng))  # open from first to last
    for n in range(steps):
        now += timedelta(seconds=rng.uniform(0, 90))  # microseconds in every time
        action = rng.random()
        if action < 0.2 or not live:
            dep = f"d{n}"
            live[dep] = rng.choice(["org/a", "b", "org/c-1.5"])
            store.open_interval(interval(dep, live[dep], "cold", now, rng))
        elif action < 0.6:
            deps = rng.sample(sorted(live), rng.randint(1, len(live)))
            changes = [
                IntervalChange(dep, open=interval(dep, live[dep], rng.choice(PHASES), now, rng))
                if rng.random() < 0.8
                else IntervalChange(dep, relabel=rng.choice(PHASES))
                for dep in deps
            ]
            store.change_intervals(changes)
        elif action < 0.9:
            dep = rng.choice(sorted(live))
            relabel = {"cold": "failed"} if rng.random() < 0.5 else None
            store.close_interval(dep, at=now, relabel=relabel)
            del live[dep]
        else:
            dep = rng.choice(sorted(live))
            del live[dep]
            store.delete_intervals(dep)
    return now


def expected(store: Store, now: datetime) -> dict[tuple[str, str], tuple[float, float]]:
    # costs.totals gives (GPU-seconds, dollars); cost_totals gives (dollars, GPU-seconds).
    return {k: (d, g) for k, (g, d) in totals(spans_of(store.intervals()), now=now).items()}


def assert_close(got: dict, want: dict) -> None:
    # A key whose intervals were all deleted or relabelled stays in the table at 0.
    assert {k for k, v in got.items() if v.dollars or v.gpu_seconds} <= set(want) <= set(got)
    for key, (dollars, gpu_seconds) in want.items():
        assert got[key].dollars == pytest.approx(dollars, rel=1e-9, abs=1e-9), key
        assert got[key].gpu_seconds == pytest.approx(gpu_seconds, rel=1e-9, abs=1e-6), key


@pytest.mark.parametrize("seed", range(8))
def test_cost_totals_match_the_pure_computation(store: Store, seed: int) -> None:
    now = random_history(store, random.Random(seed), 300)
    assert any(i.ended_at is None for i in store.intervals())  # open ones are counted too
    assert {i.phase for i in store.intervals()} >= {"failed", "serving"}
    assert_close(store.cost_totals(now), expected(store, now))
    later = now + timedelta(hours=1)  # open intervals count up to `now`
    assert_close(store.cost_totals(later), expected(store, later))


def test_reads_one_row_per_model_and_phase(store: Store) -> None:
    now = random_history(store, random.Random(99), 600)
    with Session(store.engine) as s:
        rows = list(s.exec(select(CostTotalRow)))
    assert len(rows) <= 3 * 4 < len(store.intervals())
    assert_close(store.cost_totals(now), expected(store, now))


def test_a_database_from_before_the_totals_table_is_summed_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    store.create_all()
    now = random_history(store, random.Random(5), 200)
    with store.engine.begin() as conn:  # as an older gateway left it: intervals, no totals
        conn.execute(CostTotalRow.__table__.delete())  # type: ignore[attr-defined]
        conn.exec_driver_sql("DROP INDEX ix_cost_ended")
    for _ in range(2):  # the next start fills the table; the one after leaves it alone
        restarted = Store(url)
        restarted.create_all()
        assert_close(restarted.cost_totals(now), expected(restarted, now))
    indexes = {i["name"] for i in inspect(restarted.engine).get_indexes("cost_intervals")}
    assert "ix_cost_ended" in indexes  # open intervals are found without a scan


def test_microseconds_are_kept(store: Store) -> None:
    start = datetime(2026, 11, 27, 23, 59, 59, 999_999, tzinfo=UTC)
    store.open_interval(
        CostInterval(
            deployment_id="d1",
            model="m",
            provider="fake",
            phase="serving",
            gpus=2,
            hourly_price=3600.0,
            started_at=start,
        )
    )
    store.close_interval("d1", at=start + timedelta(microseconds=2))  # across midnight
    got = store.cost_totals(start)[("m", "serving")]
    assert got.gpu_seconds == pytest.approx(4e-6, abs=1e-12)
    assert got.dollars == pytest.approx(2e-6, abs=1e-12)


def test_empty_table(store: Store) -> None:
    assert store.cost_totals(T0) == {}
