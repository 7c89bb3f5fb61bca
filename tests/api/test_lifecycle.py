"""Idle teardown, recovery after a crash and shutdown, driven with a fake clock."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.control.controller import ref_json
from state import DeploymentState, Store
from tasks.provider import ClusterRef
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


async def settle(app) -> None:  # let the stops asked for finish
    await app.state.controller.settle()


async def test_idle_deployment_is_stopped_after_keep_hot(tmp_path: Path, stub_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, keep_hot_seconds=60)
    async with running_gateway(settings, provider, clock) as (app, client):
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        reaper = app.state.reaper
        assert await reaper.tick(clock.advance(59)) == []
        [action] = await reaper.tick(clock.advance(2))
        assert action.model == "org/chat" and action.kind == "idle-stop"
        await settle(app)
        assert len(provider.stops) == 1 and not provider.running
        [dep] = app.state.store.deployments(model="org/chat")
        assert dep.state == DeploymentState.STOPPED and dep.stopped_at == clock.now
        assert [e.kind for e in app.state.store.events(model="org/chat")] == ["launch", "ready", "idle-stop"]
        # The next request cold-starts a new deployment.
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        assert len(provider.launches) == 2


async def test_model_keep_hot_overrides_default(tmp_path: Path, stub_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, {"org/chat": {"keep_hot_seconds": 5}}, keep_hot_seconds=600)
    async with running_gateway(settings, provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert len(await app.state.reaper.tick(clock.advance(6))) == 1


async def test_a_pinned_model_a_reload_removed_goes_at_its_keep_hot_time(
    tmp_path: Path, stub_url: str
) -> None:
    """No request reaches the engine of a model the reference no longer lists (requests and patch
    are 404; an admin may still unload it), so its pin goes with the listing: it is stopped once idle past the keep-hot
    time it started with, not billed until a reset or shutdown (sim seeds 468, 545, 605, 646)."""
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url)
    models = {"org/chat": {}, "pinned": {"priority": 2, "keep_hot_seconds": 30}}
    settings = make_settings(tmp_path, models, keep_hot_seconds=600)
    async with running_gateway(settings, provider, clock) as (app, client):
        body = {**CHAT_BODY, "model": "pinned"}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        reaper = app.state.reaper
        assert await reaper.tick(clock.advance(31)) == []  # pinned while listed
        settings.model_reference.write_text(json.dumps({"org/chat": {}}))
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert (await client.post("/admin/reload", headers=auth)).json()["removed"] == ["pinned"]
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 404
        [action] = await reaper.tick(clock.advance(1))
        assert (action.model, action.kind) == (
            "pinned",
            "idle-stop",
        ) and "keep_hot_seconds 30" in action.reason
        await settle(app)
        assert not provider.running


async def test_an_admin_unloads_the_engine_of_a_model_a_reload_removed(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, {"org/chat": {}, "gone": {}})
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with running_gateway(settings, provider) as (app, client):
        body = {**CHAT_BODY, "model": "gone"}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        settings.model_reference.write_text(json.dumps({"org/chat": {}}))
        assert (await client.post("/admin/reload", headers=auth)).json()["removed"] == ["gone"]
        r = await client.post("/admin/models/gone/unload", headers=auth)
        assert r.status_code == 200 and r.json() == {"model": "gone", "stopped": True}
        await settle(app)
        assert not provider.running
        r = await client.post("/admin/models/gone/unload", headers=auth)  # nothing left of it
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_never_stopped_with_a_request_in_flight(tmp_path: Path, stub_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path, keep_hot_seconds=1), provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)
        activity = app.state.controller.activity
        dep = app.state.controller.route("org/chat").deployment_id
        activity.begin("org/chat", clock(), dep)  # a long request is running
        assert await app.state.reaper.tick(clock.advance(3600)) == []
        assert not app.state.controller.stop_deployment(dep, kind="idle-stop", reason="test")
        activity.end("org/chat", clock(), dep)
        assert len(await app.state.reaper.tick(clock.advance(2))) == 1


async def test_pinned_priority_is_not_stopped_for_idleness(tmp_path: Path, stub_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path, keep_hot_seconds=1), provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json={**CHAT_BODY, "model": "pinned"})
        assert await app.state.reaper.tick(clock.advance(86400)) == []


async def test_request_during_stop_waits_for_the_old_engine_to_go(tmp_path: Path, stub_url: str) -> None:
    clock, provider = FakeClock(), FakeProvider(endpoint=stub_url, stop_delay=0.2)
    async with running_gateway(make_settings(tmp_path, keep_hot_seconds=1), provider, clock) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)
        await app.state.reaper.tick(clock.advance(5))
        response = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert response.status_code == 200
        first, second = provider.launches
        assert provider.stops[0].deployment_id == first.deployment_id
        assert second.deployment_id in provider.running and first.deployment_id not in provider.running


async def test_shutdown_stops_every_engine(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path)
    async with running_gateway(settings, provider) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)
        await client.post("/v1/chat/completions", json={**CHAT_BODY, "model": "pinned"})
        assert len(app.state.store.live_deployments()) == 2
    assert not provider.running
    assert sorted(r.data["model"] for r in provider.stops) == ["org/chat", "pinned"]
    reopened = Store(settings.resolved_database_url)
    assert not reopened.live_deployments()
    assert len(reopened.events(kind="shutdown-stop")) == 2


async def test_shutdown_during_cold_start_stops_the_launching_engine(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, ready_delay=30)
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT_BODY))
        for _ in range(100):
            if provider.running:
                break
            await asyncio.sleep(0.01)
        assert provider.running
    assert not provider.running
    # The waiting client is told, in the envelope, that the start was cancelled (not a bare 500).
    answer = await pending
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert answer.json()["error"]["code"] == "start_cancelled"
    store = Store(make_settings(tmp_path).resolved_database_url)
    assert len(store.events(kind="shutdown-stop")) == 1
    [dep] = store.deployments()
    assert dep.state == DeploymentState.STOPPED


async def test_recover_stops_what_a_crashed_gateway_left(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path)
    store = Store(settings.resolved_database_url)
    store.upgrade()
    store.create_deployment(deployment_id="orphan1", model="org/chat", provider="fake", gpus=1)
    store.transition("orphan1", expected=DeploymentState.PENDING, new=DeploymentState.LAUNCHING)
    ref = ClusterRef(
        provider="fake", name="fake-orphan1", deployment_id="orphan1", data={"model": "org/chat"}
    )
    store.update_deployment("orphan1", handle=ref_json(ref))
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(settings, provider) as (app, _):
        assert [r.name for r in provider.stops] == ["fake-orphan1"]
        dep = app.state.store.get_deployment("orphan1")
        assert dep.state == DeploymentState.STOPPED
        [event] = app.state.store.events(kind="reconciled")
        assert "earlier gateway process" in event.message and "stopped" in event.message
