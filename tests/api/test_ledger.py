"""Cost ledger arithmetic through the gateway, with a fake clock and a price of $3.60 per GPU-hour
($0.001 per GPU-second)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError

from gateway.control.fleet import ref_json
from state import CostInterval, DeploymentState, Store
from tasks.provider import ClusterRef, EngineGone, ProviderError
from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PRICES = {"default_gpu_hour": 3.6, "gpu_hour": {}}
MODELS = {"org/chat": {}, "low": {"priority": 0}, "high": {"priority": 1}, "big": {"gpus_per_replica": 2}}


def phases(store: Store, model: str) -> list[tuple[str, float, bool]]:
    """(phase, seconds, open) of a model's intervals, in order."""
    out = []
    for i in store.intervals():
        if i.model == model:
            end = i.ended_at
            out.append((i.phase, (end - i.started_at).total_seconds() if end else -1.0, end is None))
    return out


async def ended(app: FastAPI, model: str) -> None:
    """Wait until the model's runners have finished and the ledger's queued writes are written."""
    controller = app.state.controller
    for _ in range(500):
        if not controller.runners(model):
            break
        await asyncio.sleep(0.01)
    assert not controller.runners(model), "the runner did not finish"
    assert await controller.ctx.ledger.drain()


def body(model: str) -> dict:
    return {**CHAT_BODY, "model": model}


async def test_launch_ready_serve_idle_stop(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, clock=clock, launch_seconds=60, ready_seconds=40)
    settings = make_settings(tmp_path, MODELS, keep_hot_seconds=600, costs=PRICES)
    async with running_gateway(settings, provider, clock) as (app, client):
        reaper = app.state.reaper
        reaper.last_tick = clock()
        await client.post("/v1/chat/completions", json=body("big"))  # cold: 60 s launching + 40 s loading
        await reaper.tick(clock.advance(10))  # the request was in this window: serving from ready
        await reaper.tick(clock.advance(10))  # nothing: idle from here
        clock.advance(1)
        await client.post("/v1/chat/completions", json=body("big"))
        clock.advance(-1)
        await reaper.tick(clock.advance(10))  # serving again
        for _ in range(60):
            await reaper.tick(clock.advance(10))  # idle until keep-hot runs out and it is stopped
        await reaper.settle()
        store = app.state.store
        assert phases(store, "big") == [
            ("cold", 100.0, False),
            ("serving", 10.0, False),
            ("idle", 10.0, False),
            ("serving", 10.0, False),
            ("idle", 600.0, False),
        ]
        [row] = (await client.get("/admin/costs", headers=AUTH, params={"group_by": "model"})).json()
        # 2 GPUs, 730 s, $0.001 per GPU-second
        assert row["model"] == "big" and row["dollars"] == 1.46 and row["gpu_hours"] == round(1460 / 3600, 6)
        assert (row["cold_dollars"], row["serving_dollars"], row["idle_dollars"], row["failed_dollars"]) == (
            0.2,
            0.04,
            1.22,
            0.0,
        )
        by_phase = (await client.get("/admin/costs", headers=AUTH, params={"group_by": "phase"})).json()
        assert {r["phase"]: r["dollars"] for r in by_phase} == {"cold": 0.2, "idle": 1.22, "serving": 0.04}
        csv = (await client.get("/admin/costs", headers=AUTH, params={"format": "csv"})).text
        assert (
            csv.splitlines()[0]
            == "model,dollars,gpu_hours,cold_dollars,serving_dollars,idle_dollars,spare_dollars,failed_dollars"
        )
        assert csv.splitlines()[1].startswith("big,1.46,")


async def test_failed_launch_is_failed_time_and_no_capacity_is_free(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(
        endpoint=stub_url, clock=clock, launch_seconds=30, ready_error=ProviderError("oom")
    )
    settings = make_settings(tmp_path, MODELS, costs=PRICES)
    async with running_gateway(settings, provider, clock) as (app, client):
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 502
        await ended(app, "org/chat")
        assert phases(app.state.store, "org/chat") == [("failed", 30.0, False)]
        provider.ready_error, provider.capacity_gpus = None, 0
        assert (await client.post("/v1/chat/completions", json=body("low"))).status_code == 503
        await ended(app, "low")
        assert phases(app.state.store, "low") == []
        rows = (await client.get("/admin/costs", headers=AUTH)).json()
        assert rows == [
            {
                "model": "org/chat",
                "dollars": 0.03,
                "gpu_hours": round(30 / 3600, 6),
                "cold_dollars": 0.0,
                "serving_dollars": 0.0,
                "idle_dollars": 0.0,
                "spare_dollars": 0.0,
                "failed_dollars": 0.03,
            }
        ]


async def test_takeover_hands_the_interval_over_at_the_swap(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(
        endpoint=stub_url, clock=clock, launch_seconds=50, ready_seconds=50, capacity_gpus=1
    )
    settings = make_settings(tmp_path, MODELS, costs=PRICES)
    async with running_gateway(settings, provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=body("low"))
        swap_at = clock.advance(300)
        provider.launch_seconds = 0  # the capacity failure itself takes no time
        await client.post("/v1/chat/completions", json=body("high"))
        await app.state.controller.settle()  # the ledger's writes are queued to the writer
        store = app.state.store
        low = [i for i in store.intervals() if i.model == "low"]
        high = [i for i in store.intervals() if i.model == "high"]
        assert low[-1].ended_at == swap_at
        assert high[0].started_at == swap_at and high[0].phase == "cold"
        assert high[0].cluster == low[0].cluster and high[0].hourly_price == low[0].hourly_price == 3.6
        assert [(p, s) for p, s, _ in phases(store, "high")] == [("cold", 50.0), ("idle", -1.0)]


async def test_restart_resumes_adopted_and_closes_the_rest(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path, MODELS, costs=PRICES)
    store = Store(settings.resolved_database_url)
    store.upgrade()
    start = clock()

    def crashed(dep_id: str, model: str) -> ClusterRef:
        store.create_deployment(deployment_id=dep_id, model=model, provider="fake", gpus=1, at=start)
        for state in (DeploymentState.LAUNCHING, DeploymentState.LOADING, DeploymentState.READY):
            store.transition(
                dep_id, expected=DeploymentState(store.get_deployment(dep_id).state), new=state, at=start
            )
        ref = ClusterRef(provider="fake", name=f"fake-{dep_id}", deployment_id=dep_id, data={"model": model})
        store.update_deployment(dep_id, handle=ref_json(ref), cluster=ref.name)
        store.open_interval(
            CostInterval(
                deployment_id=dep_id,
                model=model,
                cluster=ref.name,
                provider="fake",
                phase="idle",
                gpus=1,
                hourly_price=3.6,
                started_at=start,
                checked_at=start,
            )
        )
        return ref

    alive = crashed("alive1", "low")
    crashed("gone1", "high")
    store.close()
    clock.advance(7200)  # the gateway was down for two hours
    provider = FakeProvider(
        endpoint=stub_url, clock=clock, adopt_on_restart=True, heartbeat_interval_seconds=600
    )
    provider.running[alive.deployment_id] = alive
    async with running_gateway(settings, provider, clock) as (app, client):
        store = app.state.store
        assert app.state.controller.phase("low") == "ready"
        # Adopted: the same interval stays open (the cluster billed all along).
        assert phases(store, "low") == [("idle", -1.0, True)]
        # Vanished: closed when the failsafe must have deleted it, 3 heartbeat intervals after it was last seen.
        [closed] = [i for i in store.intervals() if i.model == "high"]
        assert closed.ended_at == start + timedelta(seconds=1800)
        rows = {r["model"]: r["dollars"] for r in (await client.get("/admin/costs", headers=AUTH)).json()}
        assert rows == {"low": 7.2, "high": 1.8}


async def test_a_vanished_cluster_is_billed_until_its_heartbeat_was_due(
    tmp_path: Path, stub_url: str
) -> None:
    """A heartbeat finds the cluster gone (preempted) long after it was due (the gateway was
    stalled): it is billed until that heartbeat was due, not until it was sent."""
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, clock=clock, launch_seconds=30, heartbeat_interval_seconds=60)
    settings = make_settings(tmp_path, MODELS, keep_hot_seconds=3600, costs=PRICES)
    async with running_gateway(settings, provider, clock) as (app, client):
        reaper = app.state.reaper
        reaper.last_tick = clock()
        await client.post("/v1/chat/completions", json=body("low"))  # 30 s cold
        beat = clock()  # the launch armed the failsafe
        provider.heartbeat_error = EngineGone("fake-low does not exist")
        await reaper.tick(clock.advance(200))  # 140 s late: the heartbeat finds it gone
        await ended(app, "low")
        [*_, last] = [i for i in app.state.store.intervals() if i.model == "low"]
        assert last.ended_at == beat + timedelta(seconds=60)
        assert sum(s for _, s, _ in phases(app.state.store, "low")) == 90.0


async def test_an_engine_is_billed_until_it_stopped_not_until_the_store_says_so(
    tmp_path: Path, stub_url: str
) -> None:
    """The store refuses the `stopped` record for a while (the runner retries it): the ledger
    ends the interval when the engine stopped."""
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, clock=clock, launch_seconds=30)
    settings = make_settings(tmp_path, MODELS, costs=PRICES)
    async with running_gateway(settings, provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=body("low"))  # 30 s cold
        store = app.state.store
        transition, refused = store.transition, []

        def locked_once(deployment_id: str, **kwargs: Any) -> bool:
            if kwargs["new"] is DeploymentState.STOPPED and not refused:
                refused.append(clock.advance(30))  # the outage lasts 30 s
                raise OperationalError("UPDATE deployments", {}, Exception("database is locked"))
            return bool(transition(deployment_id, **kwargs))

        store.transition = locked_once
        stopped_at = clock.advance(10)
        assert (await client.post("/admin/models/low/unload", headers=AUTH)).status_code == 200
        await ended(app, "low")
        assert refused and [d.state for d in store.deployments(model="low")] == ["stopped"]
        assert [i.ended_at for i in store.intervals() if i.model == "low"][-1] == stopped_at
        assert sum(s for _, s, _ in phases(store, "low")) == 40.0
