"""The orphan sweep (gateway/control/orphans.py): clusters no runner owns are stopped by the
control loop, those a runner owns are left alone."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.control import reconcile
from state import CostInterval, DeploymentState, Store
from tasks.provider import ClusterRef, ProviderError
from tests.api.test_lifecycle import FakeClock
from tests.conftest import CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider

SWEEP = 60.0


@pytest.fixture(autouse=True)
def quick_list_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "LIST_RETRY_SECONDS", 0.0)


def left_launching(store: Store, clock: FakeClock, dep_id: str) -> None:
    """What a gateway that died mid-launch leaves: a launching row, no cluster, an open interval."""
    store.upgrade()
    started = clock() - timedelta(seconds=30)
    store.create_deployment(deployment_id=dep_id, model="org/chat", provider="fake", gpus=1, at=started)
    store.transition(dep_id, expected=DeploymentState.PENDING, new=DeploymentState.LAUNCHING, at=started)
    store.open_interval(
        CostInterval(
            deployment_id=dep_id,
            model="org/chat",
            provider="fake",
            phase="cold",
            gpus=1,
            hourly_price=1.0,
            started_at=started,
            checked_at=started + timedelta(seconds=10),
        )
    )


def cluster(dep_id: str, name: str | None = None) -> ClusterRef:
    return ClusterRef(
        provider="fake", name=name or f"fake-{dep_id}", deployment_id=dep_id, data={"model": "org/chat"}
    )


async def test_an_orphan_left_by_a_failed_list_is_stopped_and_billed(tmp_path: Path, stub_url: str) -> None:
    clock, settings = FakeClock(), make_settings(tmp_path, orphan_sweep_seconds=SWEEP)
    left_launching(Store(settings.resolved_database_url), clock, "dead1")
    provider = FakeProvider(endpoint=stub_url, list_error=ProviderError("API server unavailable"))
    provider.running["dead1"] = cluster("dead1")  # its launch made it; nobody recorded it
    async with running_gateway(settings, provider, clock) as (app, _):
        store, reaper = app.state.store, app.state.reaper
        [closed] = store.events(kind="reconciled")
        assert "no engine found" in closed.message and not provider.stops
        provider.list_error = None
        await reaper.tick(clock.advance(SWEEP - 1))  # not due yet
        await reaper.settle()
        assert not provider.stops
        stopped_at = clock.advance(2)
        await reaper.tick(stopped_at)
        await reaper.settle()
        assert [r.name for r in provider.stops] == ["fake-dead1"] and not provider.running
        [event] = store.events(kind="orphan-stopped")
        assert event.deployment_id == "dead1" and "fake-dead1" in event.message
        assert store.get_deployment("dead1").state == DeploymentState.STOPPED  # its row untouched
        [interval] = [i for i in store.intervals() if i.deployment_id == "dead1"]
        assert interval.cluster == "fake-dead1" and interval.ended_at == stopped_at
        await reaper.tick(clock.advance(SWEEP + 1))  # nothing left to stop
        await reaper.settle()
        assert len(provider.stops) == 1


async def test_clusters_a_runner_owns_are_left_alone(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path, orphan_sweep_seconds=SWEEP, keep_hot_seconds=3600)
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(settings, provider, clock) as (app, client):
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        runner = app.state.controller.live("org/chat")
        assert runner.ref is not None
        # Its cluster as a takeover or a spare swap leaves it: labelled with the first
        # deployment's id, held by this runner's ref.
        provider.running["first"] = cluster("first", name=runner.ref.name)
        provider.launch_delay = 30.0  # the next start stays launching (no ref yet)
        controller = app.state.controller
        launching = controller.load(controller.catalog.resolve("pinned"))
        while launching.state is not DeploymentState.LAUNCHING:
            await asyncio.sleep(0.01)
        assert launching.ref is None
        provider.running[launching.id] = cluster(launching.id)  # made by the launch under way
        assert controller.owns(provider.running[launching.id]) and controller.owns(provider.running["first"])
        assert not controller.owns(cluster("nobody"))
        await app.state.reaper.tick(clock.advance(SWEEP + 1))
        await app.state.reaper.settle()
        assert not provider.stops and not app.state.store.events(kind="orphan-stopped")
