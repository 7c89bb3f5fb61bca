"""Replicas through the gateway: scale-up under sustained load, routing to both, scale-down,
idle teardown of the whole model, and replicas among takeover victims (FakeProvider, real
proxy to a slow stub engine, fake clock for the control loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOT: dict[str, Any] = {
    "replicas": {"min": 0, "max": 2},
    "target_in_flight_per_replica": 1,
    "scale_up_seconds": 10,
    "scale_down_seconds": 30,
    "keep_hot_seconds": 100,
}


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    with serve_in_thread(make_app(chunk_delay=0.4)) as url:  # a stream takes ~1.6 s
        yield url


def body(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {**CHAT_BODY, "model": model, "stream": stream}


async def streams(app: FastAPI, client: httpx.AsyncClient, model: str, n: int) -> list[asyncio.Task[Any]]:
    """`n` streams of `model` in flight through the proxy (returns once they all are)."""
    before = app.state.controller.activity.in_flight(model)
    tasks = [
        asyncio.create_task(client.post("/v1/chat/completions", json=body(model, stream=True)))
        for _ in range(n)
    ]
    for _ in range(200):
        if app.state.controller.activity.in_flight(model) >= before + n:
            return tasks
        await asyncio.sleep(0.01)
    raise AssertionError("the streams did not start")


async def replicas(client: httpx.AsyncClient, model: str) -> list[dict[str, Any]]:
    status = (await client.get(f"/admin/models/{model}", headers=AUTH)).json()
    return [r for r in status["replicas"] if r["state"] == "ready"]


async def test_scale_up_route_to_both_scale_down_then_idle_stop(tmp_path: Path, slow_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=slow_url)
    settings = make_settings(tmp_path, {"hot": HOT})
    async with running_gateway(settings, provider, clock) as (app, client):
        reaper, ctl = app.state.reaper, app.state.controller
        assert (await client.post("/v1/chat/completions", json=body("hot"))).status_code == 200
        assert len(provider.launches) == 1
        load = await streams(app, client, "hot", 3)  # 3 in flight on 1 replica > target 1
        await reaper.tick(clock.advance(1))
        await reaper.tick(clock.advance(9))
        assert len(ctl.runners("hot")) == 1  # high for 9 s only
        await reaper.tick(clock.advance(1))
        assert len(ctl.runners("hot")) == 2  # high for 10 s: a second replica
        await asyncio.wait({r.ready for r in ctl.runners("hot")})
        [up] = app.state.store.events(model="hot", kind="launch")[1:]
        assert "replica requested" in up.message and "per ready replica > target 1" in up.message
        await reaper.tick(clock.advance(1))
        assert len(ctl.runners("hot")) == 2 and len(provider.launches) == 2  # at max: no third
        # New requests go to the replica with the fewest in flight: the new one.
        more = await streams(app, client, "hot", 2)
        ready = await replicas(client, "hot")
        assert len(ready) == 2 and sorted(r["in_flight"] for r in ready) == [2, 3]
        for done in await asyncio.gather(*load, *more):
            assert done.status_code == 200 and done.text.count("data: ") == 5
        counts = {r["deployment_id"]: r["requests"] for r in await replicas(client, "hot")}
        assert sorted(counts.values()) == [2, 4]  # the first served the cold one and 3 streams
        # The load is gone: after scale_down_seconds one replica goes, the busiest-so-far stays.
        await reaper.tick(clock.advance(1))
        await reaper.tick(clock.advance(29))
        assert len(await replicas(client, "hot")) == 2
        await reaper.tick(clock.advance(1))
        await reaper.settle()
        [left] = await replicas(client, "hot")
        assert counts[left["deployment_id"]] == 4  # the newer one, with as few in flight, went
        [down] = app.state.store.events(model="hot", kind="scale-down")
        assert "fit 1 replicas" in down.message
        assert len(provider.stops) == 1
        # Keep-hot counts from the model's last request, for every replica: then none.
        await reaper.tick(clock.advance(70))
        await reaper.settle()
        assert await replicas(client, "hot") == [] and len(provider.stops) == 2
        # Costs: one ledger row per replica, adding up per model.
        rows = (await client.get("/admin/costs?group_by=cluster", headers=AUTH)).json()
        assert len(rows) == 2
        [by_model] = (await client.get("/admin/costs?group_by=model", headers=AUTH)).json()
        assert by_model["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in rows))


async def test_min_replicas_are_brought_up_and_kept_while_hot(tmp_path: Path, stub_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, {"hot": {**HOT, "replicas": {"min": 2, "max": 3}}})
    async with running_gateway(settings, provider, clock) as (app, client):
        reaper = app.state.reaper
        assert (await client.post("/v1/chat/completions", json=body("hot"))).status_code == 200
        await reaper.tick(clock.advance(1))  # below min: one more at once
        assert len(app.state.controller.runners("hot")) == 2
        await asyncio.wait({r.ready for r in app.state.controller.runners("hot")})
        for _ in range(5):  # idle, but hot: scale-down never goes below min
            await reaper.tick(clock.advance(15))
        assert len(await replicas(client, "hot")) == 2 and not provider.stops
        await reaper.tick(clock.advance(30))  # keep-hot expired: the whole model goes
        await reaper.settle()
        assert await replicas(client, "hot") == [] and len(provider.stops) == 2


async def test_a_cold_start_evicts_an_extra_replica_first(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, capacity_gpus=3)
    models = {"hot": {**HOT, "priority": 3}, "low": {"priority": 0}, "mid": {"priority": 1}}
    settings = make_settings(tmp_path, models, eviction_cooldown_seconds=0)
    async with running_gateway(settings, provider, clock) as (app, client):
        reaper, ctl = app.state.reaper, app.state.controller
        assert (await client.post("/v1/chat/completions", json=body("low"))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=body("hot"))).status_code == 200
        ctl.activity.begin("hot", clock())  # sustained load on hot (no engine behind it)
        ctl.activity.begin("hot", clock())
        await reaper.tick(clock.advance(1))
        await reaper.tick(clock.advance(10))
        await asyncio.wait({r.ready for r in ctl.runners("hot")})
        assert len(await replicas(client, "hot")) == 2  # all 3 GPUs in use
        # mid (priority 1) finds no GPU: it takes hot's extra replica, not low's only engine,
        # although hot's priority is higher and low's is lower.
        assert (await client.post("/v1/chat/completions", json=body("mid"))).status_code == 200
        [(victim, spec)] = provider.swaps
        assert victim.data["model"] == "hot" and spec.model == "mid"
        assert len(await replicas(client, "hot")) == 1 and len(await replicas(client, "low")) == 1
        # hot's load is still high, but a scale-up outranks no model's last replica.
        await reaper.tick(clock.advance(11))
        await reaper.tick(clock.advance(11))
        assert len(provider.swaps) == 1 and len(await replicas(client, "hot")) == 1
        assert ctl.failure("hot") is None  # a scale-up without capacity is not a failed model
        assert (await client.post("/v1/chat/completions", json=body("hot"))).status_code == 200
        ctl.activity.end("hot", clock())
        ctl.activity.end("hot", clock())
