"""The gateway with SkyPilotProvider (fake SkyClient): failsafe heartbeats and reconcile."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.control.context import gateway_secret
from gateway.control.controller import ref_json
from state import DeploymentState, Store
from tasks.provider import ClusterRef, LaunchSpec
from tasks.sky_task import SkyTaskConfig, cluster_name
from tasks.skypilot import SkyPilotConfig, SkyPilotProvider
from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fake_sky import FakeSkyClient
from tests.stub_upstream import make_app, serve_in_thread


@pytest.fixture(scope="module")
def chat_stub() -> Iterator[str]:
    """An engine that serves org/chat: SkyPilot readiness checks that /v1/models names the model."""
    with serve_in_thread(make_app("org/chat")) as url:
        yield url


CONFIG = SkyPilotConfig(task=SkyTaskConfig(default_accelerators=("A10G",)), failsafe_minutes=30)


async def test_heartbeat_rearms_the_failsafe_every_third(tmp_path: Path, chat_stub: str) -> None:
    clock, client = FakeClock(), FakeSkyClient(endpoint=chat_stub.removeprefix("http://"))
    settings = make_settings(tmp_path, keep_hot_seconds=7200)
    async with running_gateway(settings, SkyPilotProvider(client, CONFIG), clock) as (app, http):
        assert (await http.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        [name] = client.clusters
        reaper = app.state.reaper

        async def tick(seconds: float) -> None:  # heartbeats are sent in the background
            await reaper.tick(clock.advance(seconds))
            for _ in range(20):
                await asyncio.sleep(0)

        await tick(9 * 60)
        assert not [c for c in client.calls if c[0] == "autostop"]  # the launch armed it
        await tick(61)
        await tick(60)
        assert [c for c in client.calls if c[0] == "autostop"] == [("autostop", name, 30)]
        await tick(10 * 60)
        assert len([c for c in client.calls if c[0] == "autostop"]) == 2


def seed(settings, dep_id: str, model: str, state: DeploymentState, *, name: str | None = None) -> str:
    store = Store(settings.resolved_database_url)
    store.upgrade()
    store.create_deployment(deployment_id=dep_id, model=model, provider="skypilot", gpus=1)
    for step in (DeploymentState.LAUNCHING, DeploymentState.LOADING, DeploymentState.READY):
        store.transition(dep_id, expected=DeploymentState(store.get_deployment(dep_id).state), new=step)
        if step is state:
            break
    cluster = name or cluster_name(LaunchSpec(deployment_id=dep_id, model=model))

    ref = ClusterRef(
        provider="skypilot",
        name=cluster,
        deployment_id=dep_id,
        data={"model": model, "job_id": 1, "accelerators": {"A10G": 1}},
    )
    store.update_deployment(dep_id, cluster=cluster, handle=ref_json(ref))
    store.close()
    return cluster


async def launch_cluster(client: FakeSkyClient, dep_id: str, model: str, settings) -> str:
    """A cluster an earlier gateway process of this installation launched (same key, same label)."""
    store = Store(settings.resolved_database_url)
    store.upgrade()
    instance = store.instance_id()
    store.close()
    key = hmac.new(gateway_secret(settings), dep_id.encode(), hashlib.sha256).hexdigest()
    spec = LaunchSpec(deployment_id=dep_id, model=model, engine_key=key, instance_id=instance)
    ref = await SkyPilotProvider(client, CONFIG).launch(spec)
    return ref.name


async def test_reconcile_adopts_live_marks_vanished_downs_unknown(tmp_path: Path, chat_stub: str) -> None:
    settings = make_settings(tmp_path, {"org/chat": {}, "org/gone": {}, "org/stray": {}})
    client = FakeSkyClient(endpoint=chat_stub.removeprefix("http://"))
    live = await launch_cluster(client, "dlive", "org/chat", settings)
    stray = await launch_cluster(client, "dstray", "org/stray", settings)  # not in the store
    assert seed(settings, "dlive", "org/chat", DeploymentState.READY) == live
    seed(settings, "dgone", "org/gone", DeploymentState.READY)  # its cluster no longer exists
    client.calls.clear()
    async with running_gateway(settings, SkyPilotProvider(client, CONFIG)) as (app, http):
        store = app.state.store
        assert store.get_deployment("dlive").state == DeploymentState.READY
        assert store.get_deployment("dgone").state == DeploymentState.STOPPED
        assert set(client.clusters) == {live}  # the stray one was downed
        messages = " | ".join(e.message for e in store.events(kind="reconciled"))
        assert "adopted healthy" in messages and "vanished" in messages and f"{stray}" in messages
        # The adopted engine serves at once: no launch.
        assert (await http.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        assert not [c for c in client.calls if c[0] == "launch"]


async def test_reconcile_downs_an_unhealthy_cluster(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    client = FakeSkyClient(endpoint="127.0.0.1:9")  # /health does not answer
    name = await launch_cluster(client, "dsick", "org/chat", settings)
    seed(settings, "dsick", "org/chat", DeploymentState.READY)
    async with running_gateway(settings, SkyPilotProvider(client, CONFIG)) as (app, _):
        assert app.state.store.get_deployment("dsick").state == DeploymentState.STOPPED
        assert name not in client.clusters
        [event] = app.state.store.events(kind="reconciled")
        assert "was stopped" in event.message


async def test_reconcile_resumes_waiting_for_a_loading_cluster(tmp_path: Path) -> None:
    """A restart does not throw away a cold start in progress (audit B6): a runner waits for it."""
    settings = make_settings(tmp_path)
    client = FakeSkyClient(endpoint="127.0.0.1:9")  # still loading: /health does not answer yet
    name = await launch_cluster(client, "dslow", "org/chat", settings)
    seed(settings, "dslow", "org/chat", DeploymentState.LOADING)
    async with running_gateway(settings, SkyPilotProvider(client, CONFIG)) as (app, _):
        assert app.state.store.get_deployment("dslow").state == DeploymentState.LOADING
        assert name in client.clusters and app.state.controller.phase("org/chat") == "loading"
        [event] = app.state.store.events(kind="reconciled")
        assert "adopted loading" in event.message
    assert name not in client.clusters  # shutdown stops it like any other deployment


async def test_reconcile_can_adopt_unknown_clusters(tmp_path: Path, chat_stub: str) -> None:
    settings = make_settings(tmp_path, reconcile_unknown="adopt")
    client = FakeSkyClient(endpoint=chat_stub.removeprefix("http://"))
    name = await launch_cluster(client, "dx", "org/chat", settings)
    client.calls.clear()
    async with running_gateway(settings, SkyPilotProvider(client, CONFIG)) as (app, http):
        assert name in client.clusters
        dep = app.state.store.get_deployment("dx")
        assert dep.state == DeploymentState.READY and dep.cluster == name
        assert (await http.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        assert not [c for c in client.calls if c[0] == "launch"]
    assert client.clusters == {}  # shutdown downs what the gateway holds


async def test_each_replica_is_its_own_cluster(tmp_path: Path, chat_stub: str) -> None:
    clock, client = FakeClock(), FakeSkyClient(endpoint=chat_stub.removeprefix("http://"))
    hot = {"replicas": {"min": 2, "max": 2}, "keep_hot_seconds": 600}
    settings = make_settings(tmp_path, {"org/chat": hot})
    async with running_gateway(settings, SkyPilotProvider(client, CONFIG), clock) as (app, http):
        assert (await http.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        await app.state.reaper.tick(clock.advance(1))  # hot and below min: a second replica
        ctl = app.state.controller
        await asyncio.wait({r.ready for r in ctl.runners("org/chat")})
        names = {r.ref.name for r in ctl.runners("org/chat") if r.serving}
        assert len(names) == 2 and names == set(client.clusters)
        assert names == {cluster_name(r.launch_spec) for r in ctl.runners("org/chat")}
        clock.advance(3600)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        rows = (await http.get("/admin/costs", headers=auth, params={"group_by": "cluster"})).json()
        assert {r["cluster"] for r in rows} == names
        [model] = (await http.get("/admin/costs", headers=auth, params={"group_by": "model"})).json()
        assert model["dollars"] > 0 and model["dollars"] == pytest.approx(sum(r["dollars"] for r in rows))


async def test_a_cold_start_swaps_onto_a_spare_cluster_without_a_launch(
    tmp_path: Path, chat_stub: str
) -> None:
    """A real SkyPilotProvider (fake SkyClient): after chat's keep-hot time its cluster stays up as
    a spare; other's cold start cancels chat's vLLM job and execs its own on it — no launch."""
    clock, client = FakeClock(), FakeSkyClient(endpoint=chat_stub.removeprefix("http://"))
    models = {"org/chat": {}, "org/other": {"accelerators": ["A10G", "L4"]}}
    settings = make_settings(tmp_path, models, keep_hot_seconds=60, spare_seconds=600)
    with serve_in_thread(make_app("org/other")) as other_stub:
        async with running_gateway(settings, SkyPilotProvider(client, CONFIG), clock) as (app, http):
            reaper = app.state.reaper
            reaper.last_tick = clock()
            assert (await http.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
            [name] = client.clusters
            await reaper.tick(clock.advance(61))
            await reaper.settle()
            assert app.state.controller.phase("org/chat") == "spare"
            assert not [c for c in client.calls if c[0] == "down"]
            client.clusters[name].endpoint = other_stub.removeprefix("http://")  # the new job's engine
            other = await http.post("/v1/chat/completions", json={**CHAT_BODY, "model": "org/other"})
            assert other.status_code == 200
            assert [c[1] for c in client.calls if c[0] == "launch"] == [name]
            assert ("cancel", name, (1,)) in client.calls and ("exec", name) in client.calls
            assert list(client.clusters) == [name]
            store = app.state.store
            assert [d.state for d in store.deployments(model="org/chat")] == ["stopped"]
            assert [d.cluster for d in store.deployments(model="org/other")] == [name]
        assert ("down", name) in client.calls  # shutdown downs what other holds
