"""bench/cold_start_cloud.py: the phase model adds up, each lever cuts, and measured phases are
read from a real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.cold_start_cloud import CONFIGS, PHASES, measured, table, total
from state import DeploymentState, Store


def test_every_phase_has_a_source_and_each_lever_cuts() -> None:
    assert all(p.source and 0 < p.low <= p.high for p in PHASES.values())
    for model in ("8B", "70B"):
        pip, uv, image, store, spare = (total(c, model) for c in CONFIGS)
        assert uv[1] < pip[1] and image[1] < pip[1] and store[1] < image[1] and spare[1] < store[0]
    assert total("pip (default)", "8B") == (
        sum(PHASES[p].low for p in CONFIGS["pip (default)"]),
        sum(PHASES[p].high for p in CONFIGS["pip (default)"]),
    )
    assert table().count("\n") == len(CONFIGS) + 1


def test_measured_phases_come_from_the_stores_timestamps(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    store = Store(url)
    store.upgrade()
    t0 = datetime(2026, 11, 27, 9, tzinfo=UTC)
    for dep, launch, load in [("a", 200, 300), ("b", 100, 400), ("c", 150, 350)]:
        store.create_deployment(deployment_id=dep, model="org/m", provider="skypilot", gpus=1, at=t0)
        store.transition(dep, expected=DeploymentState.PENDING, new=DeploymentState.LAUNCHING, at=t0)
        at = t0 + timedelta(seconds=launch)
        store.transition(dep, expected=DeploymentState.LAUNCHING, new=DeploymentState.LOADING, at=at)
        at += timedelta(seconds=load)
        store.transition(dep, expected=DeploymentState.LOADING, new=DeploymentState.READY, at=at)
    store.close()
    assert measured(url).splitlines()[-1] == "| skypilot:org/m | 3 | 150.0 | 350.0 |"
