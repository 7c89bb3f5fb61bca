"""Three real gateway processes on one real PostgreSQL: every one serves, the lease holder acts.

The engines are real local-provider engines (process group, nginx front, engine key) whose
server is the stub upstream (ready 2 s after it starts), so the tests take seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ROOT, GatewayProcess, start_gateway, wait_until
from tests.pg import PostgresServer

MODEL = "tiny-llama"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ENGINE = (
    f"{sys.executable} {ROOT / 'tests' / 'stub_upstream.py'} --port {{port}} --served-name {{served_name}}"
)
LEASE_SECONDS = 6.0


@pytest.fixture
def fleet(tmp_path: Path, postgres: PostgresServer) -> Iterator[list[GatewayProcess]]:
    """Three gateways on one database; the first one started holds the lease."""
    common: dict[str, Any] = {
        "database_url": postgres.create_database(),
        "controller_lease_seconds": LEASE_SECONDS,
        "max_waiting_requests": 1000,
        "fleet": {"poll_seconds": 0.5, "report_seconds": 1.0, "takeover_poll_seconds": 0.5},
        "local": {"engine_command": f"{ENGINE} --ready-after 2", "stop_grace_seconds": 5},
    }
    gateways: list[GatewayProcess] = []
    try:
        for n in range(3):
            (tmp_path / f"gw{n}").mkdir()
            gateways.append(start_gateway(tmp_path / f"gw{n}", **common))
        yield gateways
    finally:
        for gw in gateways:
            try:
                gw.terminate(timeout=60)
            finally:
                gw.kill_everything()
        assert all(gw.live_engine_groups() == [] for gw in gateways)  # nothing left running


def launches(gw: GatewayProcess) -> int:
    return len(gw.store().events(model=MODEL, kind="launch"))


async def herd(urls: list[str], n: int) -> list[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        replies = await asyncio.gather(
            *(client.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=BODY) for i in range(n)),
            return_exceptions=True,
        )
    return [r.status_code if isinstance(r, httpx.Response) else -1 for r in replies]


@contextlib.contextmanager
def load_through(gateways: list[GatewayProcess], per_gateway: int = 4) -> Iterator[list[int]]:
    """Closed loops of chat requests through `gateways` while the block runs: the statuses
    (-1: no answer)."""
    results: list[int] = []
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    results.append(c.post(f"{url}/v1/chat/completions", json=BODY).status_code)
                except httpx.HTTPError:
                    results.append(-1)

    threads = [
        threading.Thread(target=load, args=(gw.base_url,)) for gw in gateways for _ in range(per_gateway)
    ]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


def test_a_herd_over_three_gateways_makes_one_launch(fleet: list[GatewayProcess]) -> None:
    t0 = time.monotonic()
    statuses = asyncio.run(herd([gw.base_url for gw in fleet], 300))
    took = time.monotonic() - t0
    assert statuses == [200] * 300
    assert launches(fleet[0]) == 1
    [dep] = fleet[0].store().deployments(model=MODEL)
    assert dep.state == "ready"
    assert len(fleet[0].live_engine_groups()) == 1  # started by the holder, the only one
    print(f"300 cold requests over 3 gateways: all answered in {took:.1f}s, 1 launch")


def test_kill_9_of_the_holder_under_load(fleet: list[GatewayProcess]) -> None:
    holder, followers = fleet[0], fleet[1:]
    with httpx.Client(timeout=60) as client:  # warm: the engine serves
        assert client.post(f"{followers[0].base_url}/v1/chat/completions", json=BODY).status_code == 200
    store = holder.store()
    [dep] = store.deployments(model=MODEL)
    first_holder = store.lease().holder
    with load_through(followers) as results:
        time.sleep(2)
        before = len(results)
        holder.process.send_signal(signal.SIGKILL)  # by pid: its engine lives on
        holder.process.wait(timeout=30)
        killed = time.monotonic()
        assert wait_until(lambda: (store.lease() or first_holder).holder != first_holder, timeout=30)
        took_over = time.monotonic() - killed
        new = next(gw for gw in followers if str(gw.process.pid) in store.lease().holder.split(":")[1])
        assert wait_until(lambda: "gateway ready" in new.log.read_text(), timeout=30)
        time.sleep(3)  # load goes on through the new holder and the other follower
    assert took_over < LEASE_SECONDS
    assert len(results) > before + 20
    assert set(results) == {200}  # every request through the other gateways was answered
    assert launches(holder) == 1  # adopted, not launched again
    [again] = store.deployments(model=MODEL)
    assert again.id == dep.id and again.state == "ready"
    assert len(new.live_engine_groups()) == 1  # the same engine: none leaked, none doubled
    assert "adopted healthy" in store.events(kind="reconciled")[-1].message
    print(f"kill -9 of the holder: lease taken over after {took_over:.1f}s, {len(results)} requests, all 200")


def test_sigterm_of_the_holder_hands_its_engine_over(fleet: list[GatewayProcess]) -> None:
    """A graceful stop of the holder while the followers serve: the engine runs on, the lease is
    given up and taken at once, the new holder adopts the same engine; no request fails."""
    holder, followers = fleet[0], fleet[1:]
    with httpx.Client(timeout=60) as client:
        assert client.post(f"{followers[0].base_url}/v1/chat/completions", json=BODY).status_code == 200
    store = holder.store()
    [dep] = store.deployments(model=MODEL)
    first_holder = store.lease().holder
    groups = holder.live_engine_groups()
    with load_through(followers) as results:
        time.sleep(2)
        before = len(results)
        stopping = time.monotonic()
        holder.process.send_signal(signal.SIGTERM)  # by pid
        holder.process.wait(timeout=60)  # uvicorn ends by the signal it caught, once shut down
        stopped = time.monotonic() - stopping
        lease = store.lease()
        assert lease is not None and lease.holder != first_holder  # taken before the holder exited
        new = next(gw for gw in followers if str(gw.process.pid) in lease.holder.split(":")[1])
        assert wait_until(lambda: "gateway ready" in new.log.read_text(), timeout=30)
        time.sleep(3)  # load goes on through the new holder and the other follower
    assert len(results) > before + 20
    assert set(results) == {200}
    assert launches(holder) == 1  # adopted, not launched again
    [again] = store.deployments(model=MODEL)
    assert again.id == dep.id and again.state == "ready"
    assert new.live_engine_groups() == groups  # the same engine, never stopped
    assert "handed 1 deployments over" in holder.log.read_text()
    assert "gateway stopped" in holder.log.read_text()  # a graceful stop, to its end
    assert "adopted healthy" in store.events(kind="reconciled")[-1].message
    intervals = [i for i in store.intervals() if i.deployment_id == dep.id]
    assert [i.ended_at for i in intervals].count(None) == 1  # billed on, in one open interval
    print(f"SIGTERM of the holder: stopped in {stopped:.1f}s, {len(results)} requests, all 200")
