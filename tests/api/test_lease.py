"""One control loop per database: a second gateway follows until the first is gone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.clock import system_clock
from gateway.control.lease import ControllerLease, holder_id, holder_is_dead
from state import Store
from tests.api.test_lifecycle import FakeClock
from tests.conftest import make_settings, running_gateway
from tests.fakes import FakeProvider

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_lease_is_exclusive_until_expiry(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    assert store.acquire_lease("a", now=T0, until=T0 + timedelta(seconds=10))
    assert not store.acquire_lease("b", now=T0 + timedelta(seconds=5), until=T0 + timedelta(seconds=15))
    assert store.acquire_lease("a", now=T0 + timedelta(seconds=5), until=T0 + timedelta(seconds=15))  # renew
    assert store.acquire_lease(
        "b", now=T0 + timedelta(seconds=16), until=T0 + timedelta(seconds=26)
    )  # expired
    assert store.lease().holder == "b"
    assert store.acquire_lease(
        "c", now=T0 + timedelta(seconds=17), until=T0, steal_from="b"
    )  # b is known dead
    store.release_lease("b")  # not the holder: nothing happens
    assert store.lease().holder == "c"
    store.release_lease("c")
    assert store.lease() is None


def test_a_holder_renews_only_a_lease_nobody_took_meanwhile(db_url: str) -> None:
    """A holder that wakes from a stall past its lease may renew it if nobody took it; once
    another gateway took it (and changed rows), it has lost it, even if that one's lease has
    expired too (it died): renewing would act on a stale view of the deployments."""
    store = Store(db_url)
    store.upgrade()
    assert store.acquire_lease("a", now=T0, until=T0 + timedelta(seconds=10))
    assert store.renew_lease("a", until=T0 + timedelta(seconds=30))  # expired or not: still a's
    assert store.acquire_lease("b", now=T0 + timedelta(seconds=31), until=T0 + timedelta(seconds=41))
    assert not store.renew_lease("a", until=T0 + timedelta(seconds=60))  # b took it, b expired at 41
    assert store.lease().holder == "b"
    assert store.acquire_lease("a", now=T0 + timedelta(seconds=50), until=T0 + timedelta(seconds=60))
    store.release_lease("a")
    assert not store.renew_lease("a", until=T0 + timedelta(seconds=70))  # released: not renewed


def test_the_lease_keeper_loses_a_lease_another_gateway_held_meanwhile(db_url: str) -> None:
    clock = FakeClock()
    store = Store(db_url)
    store.upgrade()
    stalled = ControllerLease(store, clock, seconds=10)
    assert stalled.try_acquire()
    clock.advance(11)
    assert ControllerLease(store, clock, seconds=10).try_acquire()  # took over, then died
    clock.advance(11)
    assert not stalled.try_acquire(renew=True)  # its renewal: lost, though the row expired
    assert stalled.try_acquire()  # a fresh acquire (a restarted gateway would reconcile first)


def test_dead_holders_on_this_host_are_recognised() -> None:
    assert not holder_is_dead(holder_id())  # this process
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = holder_id().split(":")[0]
    assert holder_is_dead(f"{host}:{child.stdout.strip()}:123:ab")
    assert not holder_is_dead("other-host:1:1:ab")  # another host: only expiry tells


async def test_second_gateway_follows_until_the_first_is_gone(
    tmp_path: Path, stub_url: str, db_url: str
) -> None:
    settings = make_settings(tmp_path, controller_lease_seconds=0.6, database_url=db_url)
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (first, _):
        second = create_app(settings, provider=FakeProvider(endpoint=stub_url))
        started, leave = asyncio.Event(), asyncio.Event()

        async def run_second() -> None:
            async with second.router.lifespan_context(second):
                started.set()
                await leave.wait()

        task = asyncio.create_task(run_second())
        await asyncio.wait_for(started.wait(), 5)  # it serves at once (gateway/fleet) ...
        await asyncio.sleep(1.0)
        assert not second.state.runtime.acted  # ... but no reconcile, no control loop
        holder = first.state.store.lease().holder
    await asyncio.sleep(1.5)  # the first released the lease on shutdown
    assert second.state.runtime.acted and second.state.runtime.lease.held
    leave.set()
    await task
    assert Store(settings.resolved_database_url).lease() is None
    assert holder


async def test_a_lost_lease_stops_the_gateway(tmp_path: Path, stub_url: str, db_url: str) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path, controller_lease_seconds=0.3, database_url=db_url)
    lost = asyncio.Event()
    app = create_app(settings, provider=FakeProvider(endpoint=stub_url), clock=clock, on_lease_lost=lost.set)
    async with app.router.lifespan_context(app):
        store = app.state.store
        thief = ControllerLease(store, clock, seconds=60)
        clock.advance(1)  # our lease expired (we "stalled") and another gateway takes it
        assert thief.try_acquire()
        await asyncio.wait_for(lost.wait(), 5)


def test_only_one_of_many_concurrent_takers_gets_an_expired_lease(db_url: str) -> None:
    """The compare-and-swap under contention: 16 threads (each its own connection) race for
    a lease that has just expired, and for the first row of an empty table."""
    store = Store(db_url)
    store.upgrade()
    later = T0 + timedelta(seconds=20)

    def take(i: int, now: datetime) -> bool:
        return store.acquire_lease(f"g{i}", now=now, until=now + timedelta(seconds=10))

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(lambda i: take(i, T0), range(16)))
        second = list(pool.map(lambda i: take(100 + i, later), range(16)))
    assert first.count(True) == 1 and second.count(True) == 1
    assert store.lease().holder == f"g{100 + second.index(True)}"
    store.close()


def test_a_renewal_in_flight_cannot_bring_back_a_released_lease(db_url: str) -> None:
    """Shutdown cancels the renewal task, not its thread: a renewal still running when the lease
    is released must not write the row again (found on PostgreSQL, where a round trip is long)."""
    store = Store(db_url)
    store.upgrade()
    lease = ControllerLease(store, system_clock, seconds=10)
    assert lease.try_acquire()
    entered, go = threading.Event(), threading.Event()
    acquire = store.acquire_lease

    def paused(*args: Any, **kwargs: Any) -> bool:
        entered.set()
        go.wait(5)
        return acquire(*args, **kwargs)

    store.acquire_lease = paused  # type: ignore[method-assign]
    renewal = threading.Thread(target=lease.try_acquire)
    renewal.start()
    assert entered.wait(5)
    releasing = threading.Thread(target=lease.release)
    releasing.start()
    releasing.join(0.3)
    assert releasing.is_alive()  # it waits for the renewal in flight
    go.set()
    renewal.join(5)
    releasing.join(5)
    assert store.lease() is None
    assert not lease.try_acquire()  # released for good
    store.close()
