"""Several gateways on one database (SQLite and PostgreSQL): every one serves, the lease holder
acts. Real gateways (create_app, ASGI), FakeProvider engines answered by the stub upstream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.api.errors import GatewayError
from gateway.app import create_app
from gateway.config.settings import Settings
from gateway.fleet.follower import REPORT_LIFETIMES
from state import Store
from tasks.provider import ProviderError
from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread

FLEET = {"poll_seconds": 0.05, "report_seconds": 0.1, "takeover_poll_seconds": 0.1}


def fleet_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    overrides.setdefault("controller_lease_seconds", 2)
    return make_settings(tmp_path, database_url=db_url, fleet=FLEET, **overrides)


# With a fake clock that jumps hours, a short lease would pass to the follower.
LONG_LEASE = 10**6


@asynccontextmanager
async def follower_of(
    settings: Settings, provider: FakeProvider, clock: Any = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A second gateway on the holder's database (it starts as a follower)."""
    kwargs = {"clock": clock} if clock is not None else {}
    async with running_gateway(settings, provider, **kwargs) as (app, client):
        assert app.state.runtime.follower.active  # it follows: the holder runs first
        yield app, client


async def report_now(app: FastAPI) -> None:
    """The follower's report, written (after one its own loop may have in flight)."""
    await app.state.writer.barrier()
    assert app.state.runtime.follower.report(urgent=False)
    await app.state.writer.barrier()


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_cold_request_on_a_follower_is_launched_by_the_holder(tmp_path: Path, db_url: str) -> None:
    stub = make_app()
    with serve_in_thread(stub) as stub_url:
        settings = fleet_settings(tmp_path, db_url)
        on_holder, on_follower = FakeProvider(endpoint=stub_url), FakeProvider(endpoint=stub_url)
        async with running_gateway(settings, on_holder) as (holder, _):
            async with follower_of(settings, on_follower) as (follower, client):
                answers = await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=CHAT_BODY) for _ in range(20))
                )
                assert [r.status_code for r in answers] == [200] * 20
                assert len(on_holder.launches) == 1 and on_follower.launches == []
                [dep] = [d for d in Store(db_url).deployments() if d.state == "ready"]
                # The engine got its own key, derived as the holder derives it; never the client's.
                key = hmac.new(ADMIN_TOKEN.encode(), dep.id.encode(), hashlib.sha256).hexdigest()
                assert stub.state.counters["authorization"] == f"Bearer {key}"
                hot = await client.post("/v1/chat/completions", json=CHAT_BODY)
                assert hot.status_code == 200 and len(on_holder.launches) == 1
                assert follower.state.runtime.follower.waiting == {}
            assert holder.state.runtime.follower.active is False


async def test_a_cold_stream_on_a_follower_gets_loading_comments(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    settings = fleet_settings(tmp_path, db_url, loading_comment_seconds=0.05)
    on_holder = FakeProvider(endpoint=stub_url, ready_delay=0.5)
    async with (
        running_gateway(settings, on_holder),
        follower_of(settings, FakeProvider(endpoint=stub_url)) as (_, client),
    ):
        reply = await client.post("/v1/chat/completions", json={**CHAT_BODY, "stream": True})
    assert reply.status_code == 200
    assert reply.text.startswith(": loading org/chat phase=")
    assert reply.text.count(": loading") >= 3
    assert "data: [DONE]" in reply.text and "Hello" in reply.text


async def test_a_failed_start_reaches_the_followers_waiters(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    settings = fleet_settings(tmp_path, db_url)
    on_holder = FakeProvider(endpoint=stub_url, ready_error=ProviderError("engine exited"), ready_delay=0.2)
    async with (
        running_gateway(settings, on_holder),
        follower_of(settings, FakeProvider(endpoint=stub_url)) as (_, client),
    ):
        first = await client.post("/v1/chat/completions", json=CHAT_BODY)
        [dep] = Store(db_url).deployments()
        assert first.status_code == 502
        error = first.json()["error"]
        assert error["code"] == "engine_start_failed" and dep.id in error["message"]
        assert "engine exited" not in error["message"]  # the cause is for admins
        again = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert again.status_code == 400 and again.json()["error"]["code"] == "model_failed"
        assert len(on_holder.launches) == 1


async def test_the_followers_queue_is_bounded_and_a_gone_client_leaves_it(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    settings = fleet_settings(tmp_path, db_url, max_waiting_requests=1)
    on_holder = FakeProvider(endpoint=stub_url, ready_delay=30)
    async with (
        running_gateway(settings, on_holder),
        follower_of(settings, FakeProvider(endpoint=stub_url)) as (app, client),
    ):
        follower = app.state.runtime.follower
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT_BODY))
        await eventually(lambda: follower.waiting == {"org/chat": 1})
        full = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"]
        await eventually(lambda: len(on_holder.launches) == 1)
        waiting.cancel()  # the client goes away
        await asyncio.gather(waiting, return_exceptions=True)
        await eventually(lambda: follower.waiting == {} and follower.pending == {})


async def test_a_followers_cold_start_times_out_like_the_holders(tmp_path: Path, db_url: str) -> None:
    """No holder acts (its provider never answers ready): the follower's waiter gives up at the
    cold-start timeout with the holder's error."""
    settings = fleet_settings(tmp_path, db_url, cold_start_timeout_seconds=0.5)
    on_holder = FakeProvider(endpoint="http://127.0.0.1:9", ready_delay=30)
    async with (
        running_gateway(settings, on_holder),
        follower_of(settings, FakeProvider()) as (_, client),
    ):
        reply = await client.post("/v1/chat/completions", json=CHAT_BODY)
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "cold_start_timeout" and reply.headers["retry-after"]


async def test_followers_reports_keep_a_model_hot_and_stale_ones_do_not(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    clock = FakeClock()
    settings = fleet_settings(tmp_path, db_url, keep_hot_seconds=60, controller_lease_seconds=LONG_LEASE)
    on_holder = FakeProvider(endpoint=stub_url)
    async with running_gateway(settings, on_holder, clock) as (holder, holder_client):
        assert (await holder_client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        async with follower_of(settings, FakeProvider(endpoint=stub_url), clock) as (follower, client):
            await follower.state.runtime.follower.refresh()
            clock.advance(50)
            assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
            await report_now(follower)
            launches = holder.state.runtime.launches
            assert await launches.tick(clock()) == []  # ready: nothing to launch
            [dep_id] = [r.id for r in holder.state.controller.runners()]
            used_here = clock()
            # Per deployment too (the ledger's serving time): its last request was there.
            assert holder.state.controller.activity.last_request_of(dep_id) == used_here
            # 59 s after the holder's own last request, 9 s after the follower's: kept hot.
            assert await holder.state.reaper.tick(clock.advance(9)) == []
            # A follower gone quiet: its report goes stale and counts no more.
            clock.advance(REPORT_LIFETIMES * FLEET["report_seconds"] + 60)
            await launches.tick(clock())
            [action] = await holder.state.reaper.tick(clock())
            assert action.deployment_id == dep_id and action.kind == "idle-stop"


async def test_requests_in_flight_on_a_follower_hold_off_the_idle_stop(tmp_path: Path, db_url: str) -> None:
    clock = FakeClock()
    with serve_in_thread(make_app(chunk_delay=0.5)) as slow_url:
        settings = fleet_settings(tmp_path, db_url, keep_hot_seconds=10, controller_lease_seconds=LONG_LEASE)
        async with running_gateway(settings, FakeProvider(endpoint=slow_url), clock) as (holder, hc):
            assert (await hc.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
            async with follower_of(settings, FakeProvider(endpoint=slow_url), clock) as (follower, client):
                await follower.state.runtime.follower.refresh()
                stream = asyncio.create_task(
                    client.post("/v1/chat/completions", json={**CHAT_BODY, "stream": True})
                )
                runtime = follower.state.runtime
                await eventually(lambda: runtime.follower.activity.local_in_flight()[0] != {})
                await report_now(follower)
                await holder.state.runtime.launches.tick(clock())
                [dep_id] = [r.id for r in holder.state.controller.runners()]
                assert holder.state.controller.activity.in_flight_of(dep_id) == 1
                assert await holder.state.reaper.tick(clock.advance(3600)) == []  # busy elsewhere
                assert (await stream).status_code == 200


async def test_stale_reports_are_ignored_by_the_store(db_url: str) -> None:
    clock = FakeClock()
    store = Store(db_url)
    store.upgrade()
    row = {"model": "m", "in_flight": 2, "waiting": 1, "deployments": json.dumps({"d1": 2})}
    store.write_reports("gw-a", [{**row, "last_used_at": clock()}], at=clock())
    store.write_reports("gw-b", [{**row, "last_used_at": None}], at=clock.advance(10))
    assert {r.gateway_id for r in store.fresh_reports(clock() - timedelta(seconds=5))} == {"gw-b"}
    store.write_reports("gw-b", [], at=clock())  # nothing to report any more: its rows go
    assert store.fresh_reports(clock() - timedelta(seconds=5)) == []
    store.delete_reports("gw-a")
    assert store.fresh_reports(clock() - timedelta(seconds=3600)) == []


async def test_the_follower_takes_over_when_the_holder_leaves(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    settings = fleet_settings(tmp_path, db_url)
    on_holder, on_follower = FakeProvider(endpoint=stub_url), FakeProvider(endpoint=stub_url)
    first = create_app(settings, provider=on_holder)
    lifespan = first.router.lifespan_context(first)
    await lifespan.__aenter__()
    try:
        async with follower_of(settings, on_follower) as (second, client):
            assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
            runtime = second.state.runtime
            assert not runtime.acted
            holder = Store(db_url).lease().holder
            await lifespan.__aexit__(None, None, None)  # the holder shuts down, releasing the lease
            lifespan = None
            await eventually(lambda: not runtime.follower.active and runtime.lease.held, timeout=10)
            assert Store(db_url).lease().holder != holder
            reply = await client.post("/v1/chat/completions", json=CHAT_BODY)
            assert reply.status_code == 200 and len(on_follower.launches) == 1
    finally:
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


@pytest.mark.parametrize("n", [3])
async def test_reports_feed_the_autoscalers_load(tmp_path: Path, stub_url: str, db_url: str, n: int) -> None:
    """Waiting requests reported by a follower count in the holder's load of a model."""
    clock = FakeClock()
    settings = fleet_settings(tmp_path, db_url, controller_lease_seconds=LONG_LEASE)
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(settings, provider, clock) as (holder, _):
        store = Store(db_url)
        row = {"model": "org/chat", "in_flight": n, "waiting": 2, "deployments": "{}", "last_used_at": None}
        store.write_reports("gw-x", [row], at=clock())
        # Read by its loop, or by this tick: either way one launch.
        await holder.state.runtime.launches.tick(clock())
        await eventually(lambda: len(provider.launches) == 1)
        activity = holder.state.controller.activity
        assert activity.in_flight("org/chat") == n and activity.remote_waiting("org/chat") == 2
        await holder.state.controller.settle()


async def test_admin_calls_that_act_go_to_the_holder(tmp_path: Path, stub_url: str, db_url: str) -> None:
    settings = fleet_settings(tmp_path, db_url)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    on_holder, on_follower = FakeProvider(endpoint=stub_url), FakeProvider(endpoint=stub_url)
    async with (
        running_gateway(settings, on_holder) as (_, holder_client),
        follower_of(settings, on_follower) as (_, client),
    ):
        refused = await client.post("/admin/models/org/chat/load", headers=auth)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_lease_holder"
        assert (await client.get("/admin/models", headers=auth)).status_code == 200  # reads are fine
        assert (await holder_client.post("/admin/models/org/chat/load", headers=auth)).status_code == 202
        await eventually(lambda: Store(db_url).deployments() != [])
        assert on_follower.launches == [] and Store(db_url).deployments()[0].started_by == "admin"


async def test_an_engine_a_follower_cannot_reach_is_checked_by_the_holder(
    tmp_path: Path, db_url: str
) -> None:
    settings = fleet_settings(tmp_path, db_url)
    on_holder = FakeProvider(endpoint="http://127.0.0.1:9", healthy=False)  # "ready", then gone
    async with (
        running_gateway(settings, on_holder) as (holder, _),
        follower_of(settings, FakeProvider()) as (follower, client),
    ):
        holder.state.controller.load(holder.state.catalog.resolve("org/chat"))
        await eventually(lambda: holder.state.controller.route("org/chat") is not None)
        await follower.state.runtime.follower.refresh()
        reply = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert reply.status_code == 502 and reply.json()["error"]["type"]
        await eventually(lambda: [d.state for d in Store(db_url).deployments()] == ["failed"])
        assert [e.kind for e in Store(db_url).events(kind="engine-failed")] == ["engine-failed"]


async def test_a_followers_controller_starts_nothing(tmp_path: Path, stub_url: str, db_url: str) -> None:
    """The follower's own controller (its code path, should anything call it) refuses every
    start: no row, no launch, the OpenAI envelope's 503."""
    settings = fleet_settings(tmp_path, db_url)
    on_follower = FakeProvider(endpoint=stub_url)
    async with (
        running_gateway(settings, FakeProvider(endpoint=stub_url)),
        follower_of(settings, on_follower) as (follower, _),
    ):
        controller = follower.state.controller
        spec = follower.state.catalog.resolve("org/chat")
        for start in (lambda: controller.load(spec), lambda: controller.admit(spec)):
            with pytest.raises(GatewayError) as refused:
                start()
            assert refused.value.status == 503 and refused.value.code == "not_lease_holder"
        assert controller.runners() == [] and controller.waiting("org/chat") == 0
        assert Store(db_url).deployments() == [] and on_follower.launches == []


def contiguous(intervals: list[Any]) -> bool:
    """One deployment's cost intervals follow each other without a gap or an overlap."""
    spans = sorted(intervals, key=lambda i: i.started_at)
    return all(a.ended_at == b.started_at for a, b in itertools.pairwise(spans))


async def test_a_holder_that_stops_hands_its_engines_to_a_live_follower(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    settings = fleet_settings(tmp_path, db_url)
    provider = FakeProvider(endpoint=stub_url, adopt_on_restart=True)  # one cloud, seen by both
    first = create_app(settings, provider=provider)
    lifespan = first.router.lifespan_context(first)
    await lifespan.__aenter__()
    try:
        async with follower_of(settings, provider) as (second, client):
            first.state.controller.load(first.state.catalog.resolve("org/chat"))
            await eventually(lambda: first.state.controller.route("org/chat") is not None)
            [dep] = Store(db_url).deployments()
            runtime = second.state.runtime
            # Idle (no request yet), it still says it lives: its loop reports every interval.
            since = second.state.controller.clock()
            await eventually(lambda: Store(db_url).live_gateways(since) == [runtime.lease.holder])
            await lifespan.__aexit__(None, None, None)  # a graceful stop of the holder
            lifespan = None
            # Given up, not expired: taken within the takeover poll, before the stop returned.
            assert Store(db_url).lease().holder == runtime.lease.holder
            await eventually(lambda: not runtime.follower.active, timeout=10)
            assert provider.stops == [] and len(provider.launches) == 1  # the engine ran on
            [after] = Store(db_url).deployments()
            assert (after.id, after.state) == (dep.id, "ready")
            assert [r.id for r in second.state.controller.runners()] == [dep.id]
            assert [e.kind for e in Store(db_url).events(kind="handover")] == ["handover"]
            reply = await client.post("/v1/chat/completions", json=CHAT_BODY)
            assert reply.status_code == 200 and len(provider.launches) == 1
            await second.state.runtime.controller.ctx.ledger.drain()
            intervals = Store(db_url).intervals()
            assert {i.deployment_id for i in intervals} == {dep.id} and contiguous(intervals)
            assert [i.ended_at for i in intervals].count(None) == 1
    finally:
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)
    assert len(provider.stops) == 1  # the last gateway, alone, stops it
    assert [d.state for d in Store(db_url).deployments()] == ["stopped"]


async def test_a_holder_whose_follower_does_not_take_over_stops_the_engines(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    """A follower seen alive that never takes the lease (it died meanwhile): the holder takes the
    lease back after the takeover wait and stops what it left, as a lone gateway does."""
    settings = fleet_settings(tmp_path, db_url)
    provider = FakeProvider(endpoint=stub_url, adopt_on_restart=True)
    async with running_gateway(settings, provider) as (holder, client):
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        Store(db_url).write_reports("gw-gone", [], at=holder.state.controller.clock())
    assert len(provider.stops) == 1 and len(provider.launches) == 1
    assert [d.state for d in Store(db_url).deployments()] == ["stopped"]
    assert Store(db_url).open_intervals() == [] and Store(db_url).lease() is None
    assert [e.kind for e in Store(db_url).events(kind="handover")] == ["handover"]  # it tried


@pytest.mark.parametrize("path", ["/admin/failures/org/chat", "/admin/failures"])
async def test_an_admin_reset_of_a_failure_reaches_the_followers(
    tmp_path: Path, stub_url: str, db_url: str, path: str
) -> None:
    settings = fleet_settings(tmp_path, db_url)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    on_holder = FakeProvider(endpoint=stub_url, ready_error=ProviderError("engine exited"))
    async with (
        running_gateway(settings, on_holder) as (holder, holder_client),
        follower_of(settings, FakeProvider(endpoint=stub_url)) as (follower, client),
    ):
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 502
        failed = await client.post("/v1/chat/completions", json=CHAT_BODY)
        assert failed.status_code == 400 and failed.json()["error"]["code"] == "model_failed"
        on_holder.ready_error = None  # the admin fixed the cause
        reset = await holder_client.delete(path, headers=auth)
        assert reset.status_code == 200 and reset.json()["reset"] == ["org/chat"]
        await holder.state.writer.barrier()
        await follower.state.runtime.follower.refresh()
        assert follower.state.runtime.follower.failure("org/chat") is None
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        assert len(on_holder.launches) == 2
