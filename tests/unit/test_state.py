from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from state import ALLOWED, TERMINAL, DeploymentState, InvalidTransition, Store
from state.machine import check_transition
from state.store import IntervalChange

S = DeploymentState


def test_transition_table_shape() -> None:
    assert set(ALLOWED) == set(DeploymentState)
    assert {S.STOPPED, S.FAILED} == TERMINAL
    # Every non-terminal state can fail and can be stopped (or is already stopping).
    for state in set(DeploymentState) - TERMINAL:
        assert S.FAILED in ALLOWED[state]
        assert S.STOPPING in ALLOWED[state] or state is S.STOPPING
    # The happy path.
    path = [S.PENDING, S.LAUNCHING, S.LOADING, S.READY, S.DRAINING, S.STOPPING, S.STOPPED]
    for a, b in itertools.pairwise(path):
        check_transition(a, b)
    with pytest.raises(InvalidTransition):
        check_transition(S.STOPPED, S.READY)
    with pytest.raises(InvalidTransition):
        check_transition(S.PENDING, S.READY)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    store.upgrade()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_transition_is_compare_and_swap(store: Store) -> None:
    store.create_deployment(deployment_id="d1", model="m", provider="local", gpus=1)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert store.transition("d1", expected=S.PENDING, new=S.LAUNCHING, at=at)
    assert not store.transition("d1", expected=S.PENDING, new=S.LAUNCHING)  # no longer pending
    dep = store.get_deployment("d1")
    assert dep is not None and dep.current is S.LAUNCHING and dep.launching_at == at
    with pytest.raises(InvalidTransition):
        store.transition("d1", expected=S.LAUNCHING, new=S.STOPPED)


def test_only_one_of_many_concurrent_writers_wins(store: Store) -> None:
    store.create_deployment(deployment_id="d1", model="m", provider="local", gpus=1)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: store.transition("d1", expected=S.PENDING, new=S.FAILED), range(16))
        )
    assert results.count(True) == 1


def test_transition_writes_extra_fields_and_live_query(store: Store) -> None:
    store.create_deployment(deployment_id="a", model="m1", provider="local", gpus=1)
    store.create_deployment(deployment_id="b", model="m2", provider="local", gpus=2)
    store.transition("b", expected=S.PENDING, new=S.FAILED, error="no weights")
    assert [d.id for d in store.live_deployments()] == ["a"]
    failed = store.get_deployment("b")
    assert failed is not None and failed.error == "no weights" and failed.failed_at is not None
    with pytest.raises(ValueError):
        store.update_deployment("a", state="ready")


def test_touch_models_batch_and_events(store: Store) -> None:
    at = datetime(2026, 5, 1, tzinfo=UTC)
    store.touch_models({"x": at, "y": at})
    rec = store.get_model("x")
    assert rec is not None and rec.last_used_at == at
    store.record_event(kind="launch", model="x", message="why")
    store.record_event(kind="ready", model="y")
    assert [e.kind for e in store.events(model="x")] == ["launch"]
    assert [e.model for e in store.events(kind="ready")] == ["y"]


def test_an_interval_closed_before_it_began_lasts_no_time(store: Store) -> None:
    """Closing at a moment before the open interval's start (a vanished cluster billed up to
    when it was last known to run) leaves it 0 s long, not negative."""
    t0, t1, t2 = (datetime(2026, 1, 1, 0, m, tzinfo=UTC) for m in (0, 10, 20))

    def opened(at: datetime, phase: str) -> IntervalChange:
        row = {
            "deployment_id": "d1",
            "model": "m",
            "cluster": "c1",
            "provider": "fake",
            "phase": phase,
            "gpus": 1,
            "hourly_price": 1.0,
            "started_at": at,
            "ended_at": None,
            "checked_at": at,
        }
        return IntervalChange(deployment_id="d1", open=row)

    store.change_intervals([opened(t0, "idle")])
    store.change_intervals([opened(t2, "serving")])
    store.close_interval("d1", at=t1)
    assert [(i.phase, i.started_at, i.ended_at) for i in store.intervals()] == [
        ("idle", t0, t2),
        ("serving", t2, t2),
    ]
