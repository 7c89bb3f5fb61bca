"""Capacity takeover through the gateway with a FakeProvider that runs out of GPUs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread

MODELS = {
    "low": {"priority": 0},
    "mid": {"priority": 1},
    "top": {"priority": 3},
    "pinned": {"priority": 2},
    "big": {"priority": 1, "gpus_per_replica": 2},
}


def body(model: str) -> dict:
    return {**CHAT_BODY, "model": model}


async def test_higher_priority_takes_over_and_events_name_both(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, capacity_gpus=1)
    async with running_gateway(make_settings(tmp_path, MODELS), provider) as (app, client):
        assert (await client.post("/v1/chat/completions", json=body("low"))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=body("mid"))).status_code == 200
        [(victim_ref, new_spec)] = provider.swaps
        assert victim_ref.data["model"] == "low" and new_spec.model == "mid"
        store = app.state.store
        [evicted] = store.events(model="low", kind="evicted")
        assert "evicted by mid" in evicted.message
        [takeover] = store.events(model="mid", kind="takeover")
        assert "from low" in takeover.message and victim_ref.name in takeover.message
        assert [d.state for d in store.deployments(model="low")] == ["stopped"]
        models = {m["id"]: m["state"] for m in (await client.get("/v1/models")).json()["data"]}
        assert models["low"] == "stopped" and models["mid"] == "ready"
        # The reverse request: low may not evict mid (lower priority) -> 503 capacity_unavailable.
        reverse = await client.post("/v1/chat/completions", json=body("low"))
        assert reverse.status_code == 503 and reverse.json()["error"]["code"] == "capacity_unavailable"
        assert "retry-after" in reverse.headers
        assert not store.events(model="low", kind="takeover")


async def test_no_takeover_of_pinned_or_too_small(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, capacity_gpus=1)
    async with running_gateway(make_settings(tmp_path, MODELS), provider) as (_, client):
        assert (await client.post("/v1/chat/completions", json=body("pinned"))).status_code == 200
        top = await client.post("/v1/chat/completions", json=body("top"))
        assert top.status_code == 503  # pinned (priority 2) is never evicted
        assert not provider.swaps
    provider = FakeProvider(endpoint=stub_url, capacity_gpus=1)
    async with running_gateway(make_settings(tmp_path / "b", MODELS), provider) as (_, client):
        assert (await client.post("/v1/chat/completions", json=body("low"))).status_code == 200
        assert (
            await client.post("/v1/chat/completions", json=body("big"))
        ).status_code == 503  # needs 2 GPUs
        assert not provider.swaps


async def test_no_thrash_within_cooldown(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, capacity_gpus=1)
    settings = make_settings(tmp_path, MODELS, eviction_cooldown_seconds=600)
    async with running_gateway(settings, provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=body("low"))
        await client.post("/v1/chat/completions", json=body("mid"))  # mid evicts low
        # An admin raises low above mid: low could now evict mid, but not within the cooldown.
        app.state.catalog.set_override("low", priority=2)
        clock.advance(60)
        assert (await client.post("/v1/chat/completions", json=body("low"))).status_code == 503
        clock.advance(600)
        assert (await client.post("/v1/chat/completions", json=body("low"))).status_code == 200
        assert [s.model for _, s in provider.swaps] == ["mid", "low"]


async def test_takeover_waits_for_requests_in_flight(tmp_path: Path) -> None:
    with serve_in_thread(make_app(chunk_delay=0.15)) as slow_url:  # a stream takes ~0.6 s
        provider = FakeProvider(endpoint=slow_url, capacity_gpus=1)
        settings = make_settings(tmp_path, MODELS, drain_seconds=5)
        async with running_gateway(settings, provider) as (app, client):
            await client.post("/v1/chat/completions", json=body("low"))
            # A real stream of low is in flight through the proxy while mid asks for the GPU.
            low = asyncio.create_task(
                client.post("/v1/chat/completions", json={**body("low"), "stream": True})
            )
            await asyncio.sleep(0.1)
            mid = asyncio.create_task(client.post("/v1/chat/completions", json=body("mid")))
            await asyncio.sleep(0.2)
            assert not provider.swaps and not mid.done()  # draining: waits for the request
            assert app.state.controller.phase("low") == "draining"
            assert (await low).text.count("data: ") == 5  # four pieces and [DONE]: not cut short
            assert (await mid).status_code == 200
            assert len(provider.swaps) == 1


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_a_start_cut_short_while_its_victim_drains_costs_nothing(tmp_path: Path) -> None:
    """mid waits for low's cluster (low drains a request in flight) and is unloaded meanwhile:
    it never held a GPU (low's cluster is billed to low until it stops), so it bills nothing."""
    with serve_in_thread(make_app(chunk_delay=0.15)) as slow_url:
        provider = FakeProvider(endpoint=slow_url, capacity_gpus=1)
        settings = make_settings(tmp_path, MODELS, drain_seconds=5)
        async with running_gateway(settings, provider) as (app, client):
            await client.post("/v1/chat/completions", json=body("low"))
            low = asyncio.create_task(
                client.post("/v1/chat/completions", json={**body("low"), "stream": True})
            )
            await asyncio.sleep(0.1)
            mid = asyncio.create_task(client.post("/v1/chat/completions", json=body("mid")))
            await asyncio.sleep(0.2)
            assert app.state.controller.phase("low") == "draining" and not mid.done()
            unload = await client.post("/admin/models/mid/unload", headers=AUTH)
            assert unload.status_code == 200
            cut = await mid
            assert cut.status_code == 503 and cut.json()["error"]["code"] == "start_cancelled"
            await low
            await app.state.controller.settle()
            assert await app.state.controller.ctx.ledger.drain()
            assert not provider.swaps
            models = {i.model for i in app.state.store.intervals()}
            assert models == {"low"}  # mid: nothing, not its wait as cold time


async def test_failed_start_is_remembered_until_reset(tmp_path: Path, stub_url: str) -> None:
    from tasks.provider import ProviderError

    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, launch_error=ProviderError("weights are corrupt"))
    settings = make_settings(tmp_path, {"org/chat": {}, "low": {}}, failed_model_ttl_seconds=300)
    async with running_gateway(settings, provider, clock) as (app, client):
        first = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert first.status_code == 502
        second = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert second.status_code == 400
        error = second.json()["error"]
        assert error["code"] == "model_failed" and "weights are corrupt" not in error["message"]
        [failure] = (await client.get("/admin/failures", headers=AUTH)).json()
        assert "weights are corrupt" in failure["error"]
        assert len(provider.launches) == 1
        provider.launch_error = None
        await app.state.reaper.tick(clock.advance(301))  # TTL passed: forgotten
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        # Capacity failures are not remembered (low, priority 0, cannot evict org/chat, priority 0).
        provider.capacity_gpus = 1
        other = await client.post("/v1/chat/completions", json=body("low"))
        assert other.status_code == 503
        assert app.state.controller.failure("low") is None


async def test_hf_token_per_request_reaches_the_engine_not_the_store(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    token = "hf_request_token_abcdef"
    settings = make_settings(tmp_path, hf_token="hf_settings_token_xyz")
    async with running_gateway(settings, provider) as (_, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY, headers={"X-HF-Token": token})
        await client.post("/v1/chat/completions", json=body("pinned"))
        assert provider.launches[0].secrets == {"HF_TOKEN": token}
        assert provider.launches[1].secrets == {"HF_TOKEN": "hf_settings_token_xyz"}
        assert token not in repr(provider.launches[0])
    raw = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("gateway.db*"))
    assert token.encode() not in raw and b"hf_settings_token_xyz" not in raw


async def test_after_hours_stops_everything_and_prewarm_loads(tmp_path: Path, stub_url: str) -> None:
    from datetime import UTC, datetime

    clock = FakeClock()
    clock.now = datetime(2026, 6, 2, 3, 50, tzinfo=UTC)  # 22:50 in Chicago (CDT)
    provider = FakeProvider(endpoint=stub_url)
    settings = make_settings(
        tmp_path,
        MODELS,
        after_hours={"cron": "0 23 * * *", "timezone": "America/Chicago"},
        prewarm=[{"cron": "30 8 * * *", "timezone": "America/Chicago", "models": ["mid"]}],
    )
    async with running_gateway(settings, provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=body("pinned"))
        await client.post("/v1/chat/completions", json=body("low"))
        reaper = app.state.reaper
        reaper.last_tick = clock()
        assert await reaper.tick(clock.advance(5 * 60)) == []
        stops = await reaper.tick(clock.advance(6 * 60))  # 23:01
        assert sorted(a.model for a in stops) == ["low", "pinned"]
        await reaper.settle()
        assert not provider.running
        assert len(app.state.store.events(kind="after-hours-stop")) == 2
        await reaper.tick(clock.advance(9.5 * 3600))  # 08:31 next morning
        await reaper.settle()
        assert [s.model for s in provider.launches][-1] == "mid"
        assert app.state.controller.phase("mid") == "ready"
        assert app.state.store.events(kind="prewarm")
