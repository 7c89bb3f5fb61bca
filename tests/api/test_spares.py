"""Spare clusters through the gateway, with a FakeProvider that keeps spares and a fake clock:
after its keep-hot time a cluster stays up for `spare_seconds`, and a cold start that fits it
swaps onto it instead of launching. $3.60 per GPU-hour ($0.001 per GPU-second)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

from gateway.control.fleet import ref_json
from state import CostInterval, DeploymentState, Store
from tasks.provider import ClusterRef
from tests.api.test_ledger import PRICES, phases
from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODELS: dict[str, Any] = {
    "a": {"keep_hot_seconds": 60, "spare_seconds": 300},
    "b": {"keep_hot_seconds": 60},
    "c": {},
    "h100": {"accelerators": ["H100"]},
    "big": {"gpus_per_replica": 2},
}


S = DeploymentState
WALK = (S.PENDING, S.LAUNCHING, S.LOADING, S.READY, S.SPARE)


def body(model: str) -> dict[str, Any]:
    return {**CHAT_BODY, "model": model}


def states(store: Store, model: str) -> list[str]:
    return [d.state for d in store.deployments(model=model)]


def kinds(store: Store, model: str) -> list[str]:
    return [e.kind for e in store.events(model=model)]


def gateway(tmp_path: Path, stub_url: str, clock: FakeClock, **overrides: Any) -> Any:
    provider = FakeProvider(endpoint=stub_url, clock=clock, keeps_spares=True, accelerators=("L4",))
    settings = make_settings(tmp_path, MODELS, costs=PRICES, **overrides)
    return provider, running_gateway(settings, provider, clock)


async def spare_of_a(app: Any, client: Any, clock: FakeClock) -> None:
    """`a` served once, then idle past its keep-hot time: a spare."""
    reaper = app.state.reaper
    reaper.last_tick = clock()
    assert (await client.post("/v1/chat/completions", json=body("a"))).status_code == 200
    assert await reaper.tick(clock.advance(60)) == []
    [action] = await reaper.tick(clock.advance(1))
    assert action.kind == "idle-stop" and action.spare
    await reaper.settle()


async def test_keep_hot_expiry_makes_a_spare_shown_by_the_admin_api(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    async with running as (app, client):
        await spare_of_a(app, client, clock)
        store = app.state.store
        assert states(store, "a") == ["spare"] and not provider.stops
        assert kinds(store, "a")[-2:] == ["idle-stop", "spare"]
        [model] = [m for m in (await client.get("/admin/models", headers=AUTH)).json() if m["id"] == "a"]
        assert model["state"] == "spare" and model["spare_seconds"] == 300
        assert model["spare_until"] == (clock() + timedelta(seconds=300)).isoformat()
        info = (await client.get("/admin/info", headers=AUTH)).json()
        assert info["deployments"] == {"spare": 1}
        [cluster] = (await client.get("/admin/clusters", headers=AUTH)).json()
        assert cluster["state"] == "spare" and cluster["held_by"] == model["deployment_id"]
        # A spare serves nothing: a request for `a` is a cold start (and swaps onto a's own spare).
        assert (await client.post("/v1/chat/completions", json=body("a"))).status_code == 200
        assert len(provider.launches) == 1 and [s.model for _, s in provider.swaps] == ["a"]
        assert states(store, "a") == ["ready", "stopped"]


async def test_cold_start_that_fits_swaps_onto_the_spare(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    async with running as (app, client):
        await spare_of_a(app, client, clock)
        swap_at = clock.advance(100)
        provider.ready_seconds = 30  # the swapped engine loads for 30 s
        assert (await client.post("/v1/chat/completions", json=body("b"))).status_code == 200
        [launch] = provider.launches
        assert launch.model == "a"  # b was not launched
        [(spare_ref, spec)] = provider.swaps
        assert spare_ref.data["model"] == "a" and spec.model == "b" and not provider.stops
        await app.state.controller.settle()  # the ledger's and events' writes are queued
        store = app.state.store
        assert states(store, "a") == ["stopped"] and states(store, "b") == ["ready"]
        assert kinds(store, "a")[-2:] == ["spare-claimed", "handed-over"]
        assert "spare-swap" in kinds(store, "b")
        # The ledger: a's spare interval ends at the swap, b's starts there on the same cluster.
        assert [(p, s) for p, s, _ in phases(store, "a")] == [("idle", 61.0), ("spare", 100.0)]
        [b_cold, *_] = [i for i in store.intervals() if i.model == "b"]
        assert b_cold.started_at == swap_at and b_cold.cluster == spare_ref.name
        assert [(p, s) for p, s, _ in phases(store, "b")] == [("cold", 30.0), ("idle", -1.0)]


async def test_one_spare_goes_to_one_cold_start(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    async with running as (app, client):
        await spare_of_a(app, client, clock)
        b, c = await asyncio.gather(
            client.post("/v1/chat/completions", json=body("b")),
            client.post("/v1/chat/completions", json=body("c")),
        )
        assert b.status_code == c.status_code == 200
        [(_, swapped)] = provider.swaps
        assert sorted(s.model for s in provider.launches) == sorted(
            ["a", "c" if swapped.model == "b" else "b"]
        )
        assert states(app.state.store, "a") == ["stopped"]


async def test_cold_start_that_does_not_fit_launches(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    async with running as (app, client):
        await spare_of_a(app, client, clock)
        assert (await client.post("/v1/chat/completions", json=body("big"))).status_code == 200  # 2 GPUs
        assert (await client.post("/v1/chat/completions", json=body("h100"))).status_code == 200  # not L4
        assert [s.model for s in provider.launches] == ["a", "big", "h100"] and not provider.swaps
        assert states(app.state.store, "a") == ["spare"]


async def test_spare_expires_and_is_billed_as_spare_until_then(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    async with running as (app, client):
        await spare_of_a(app, client, clock)
        reaper = app.state.reaper
        assert await reaper.tick(clock.advance(300)) == []
        [action] = await reaper.tick(clock.advance(1))
        assert action.kind == "spare-expired"
        await reaper.settle()
        store = app.state.store
        [stopped] = provider.stops
        assert stopped.data["model"] == "a" and states(store, "a") == ["stopped"]
        assert phases(store, "a") == [("idle", 61.0, False), ("spare", 301.0, False)]
        rows = (await client.get("/admin/costs", headers=AUTH)).json()
        [row] = [r for r in rows if r["model"] == "a"]
        # 362 s held in all, 1 GPU: idle 61 s, spare 301 s, priced alike.
        assert (row["dollars"], row["idle_dollars"], row["spare_dollars"]) == (0.362, 0.061, 0.301)


async def test_after_hours_downs_spares(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()  # 12:00 UTC
    after_hours = {"cron": "10 12 * * *", "timezone": "UTC"}
    provider, running = gateway(tmp_path, stub_url, clock, after_hours=after_hours)
    async with running as (app, client):
        await spare_of_a(app, client, clock)  # 12:01
        [action] = await app.state.reaper.tick(clock.advance(9 * 60))
        assert action.kind == "after-hours-stop" and action.model == "a"
        await app.state.reaper.settle()
        assert states(app.state.store, "a") == ["stopped"] and len(provider.stops) == 1


async def test_shutdown_stops_spares(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    async with running as (app, client):
        await spare_of_a(app, client, clock)
        store = app.state.store
    assert [r.data["model"] for r in provider.stops] == ["a"] and not provider.running
    assert states(store, "a") == ["stopped"]


async def test_restart_stops_a_spare_left_behind(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path, MODELS, costs=PRICES)
    store = Store(settings.resolved_database_url)
    store.upgrade()
    start = clock()
    store.create_deployment(deployment_id="spare1", model="a", provider="fake", gpus=1, at=start)
    for old, new in itertools.pairwise(WALK):
        assert store.transition("spare1", expected=old, new=new, at=start)
    ref = ClusterRef(provider="fake", name="fake-spare1", deployment_id="spare1", data={"model": "a"})
    store.update_deployment("spare1", handle=ref_json(ref), cluster=ref.name)
    store.open_interval(
        CostInterval(
            deployment_id="spare1",
            model="a",
            cluster=ref.name,
            provider="fake",
            phase="spare",
            gpus=1,
            hourly_price=3.6,
            started_at=start,
            checked_at=start,
        )
    )
    store.close()
    clock.advance(120)  # the gateway was down for two minutes; the cluster still runs
    provider = FakeProvider(endpoint=stub_url, clock=clock, keeps_spares=True, adopt_on_restart=True)
    provider.running["spare1"] = ref
    async with running_gateway(settings, provider, clock) as (app, _):
        store = app.state.store
        assert [r.name for r in provider.stops] == ["fake-spare1"]
        assert states(store, "a") == ["stopped"]
        assert phases(store, "a") == [("spare", 120.0, False)]


async def test_no_spares_where_the_provider_keeps_none(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider, running = gateway(tmp_path, stub_url, clock)
    provider.keeps_spares = False  # the local provider
    async with running as (app, client):
        reaper = app.state.reaper
        reaper.last_tick = clock()
        await client.post("/v1/chat/completions", json=body("a"))
        await reaper.tick(clock.advance(61))
        await reaper.settle()
        assert states(app.state.store, "a") == ["stopped"] and len(provider.stops) == 1
