"""Benchmark: three gateway processes on one database (PostgreSQL when installed, else SQLite),
every one serving, the lease holder acting. Measured in one run:

- throughput: RPS through one gateway, then through all three at once (wrk, the same total of
  connections), to a model whose `endpoint` is the fast stub (bench/stub_server.py); ABAB turns;
- a herd: `N` simultaneous cold requests spread over the three gateways (local provider, the stub
  as the engine, ready 2 s after it starts): time to the last answer, launches (must be 1);
- failover: kill -9 of the holder while the followers serve a hot model: time until another
  gateway holds the lease, until it has reconciled (adopted the engine), and the longest gap
  between two answers through the followers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import uvloop

from bench import load, wrk
from bench.gateway_proc import Gateway, start_gateway
from bench.http_client import Reply, post_request
from bench.procs import ROOT, stub_server
from bench.report import BenchResult, Row, Target
from bench.suite import Context, log

NAME = "multi_gateway"
HOT, COLD = "fleet-endpoint", "fleet-cold"
READY_AFTER = 2.0
# The stub of the tests as the engine: it lists its model on /v1/models, which the local
# provider's readiness check asks for (bench/stub_server.py does not).
ENGINE_COMMAND = (
    f"{sys.executable} {ROOT / 'tests' / 'stub_upstream.py'} --port {{port}} --served-name {{served_name}} "
    f"--ready-after {READY_AFTER}"
)
LEASE_SECONDS = 6.0
GATEWAYS = 3
CONNECTIONS = 33  # 11 per gateway in the three-way turns


def body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def database(stack: ExitStack, workdir: Path) -> tuple[str, str]:
    """A PostgreSQL database of a server started here, else a SQLite file; (url, kind)."""
    from tests import pg

    bindir = pg.find_bin()
    if bindir is None:
        log.warning("%s: PostgreSQL is not installed: three gateways on one SQLite file", NAME)
        return f"sqlite:///{workdir / 'fleet.db'}", "sqlite"
    server = pg.start(bindir)
    stack.callback(server.stop)
    return server.create_database(), "postgresql"


def start_fleet(stack: ExitStack, workdir: Path, stub_url: str, db_url: str) -> list[Gateway]:
    models = {HOT: {"endpoint": stub_url}, COLD: {}}
    settings: dict[str, Any] = {
        "database_url": db_url,
        "controller_lease_seconds": LEASE_SECONDS,
        "max_waiting_requests": 5000,
        "fleet": {"poll_seconds": 0.5, "report_seconds": 1.0, "takeover_poll_seconds": 0.5},
        "local": {"gpu_ids": ["0"], "engine_command": ENGINE_COMMAND, "stop_grace_seconds": 5},
        "log_level": "WARNING",
    }
    gateways = []
    for n in range(GATEWAYS):
        gw = start_gateway(workdir / f"gw{n}", models, **settings)
        gw = dataclasses.replace(gw, db_url=db_url)
        stack.callback(gw.stop)
        gateways.append(gw)
    return gateways


def throughput(ctx: Context, gateways: list[Gateway]) -> dict[str, Any]:
    """wrk through one gateway, then through the three at once (the same connections in all), in
    turns; the best turn of each."""
    seconds, turns = ctx.pick(10.0, 3.0), ctx.pick(2, 1)
    one, three = [], []
    for _ in range(turns):
        r = wrk.run_wrk(
            gateways[0].base_url,
            "/v1/chat/completions",
            body(HOT),
            connections=CONNECTIONS,
            seconds=seconds,
            workdir=ctx.workdir,
        )
        one.append(r.rps)
        three.append(three_at_once(ctx, gateways, seconds))
    return {"rps_one": max(one), "rps_three": max(three), "turns": turns, "seconds": seconds}


def three_at_once(ctx: Context, gateways: list[Gateway], seconds: float) -> float:
    results: list[wrk.WrkResult] = []

    def each(gw: Gateway, n: int) -> None:
        work = ctx.workdir / f"wrk{n}"
        work.mkdir(exist_ok=True)
        conns = CONNECTIONS // GATEWAYS
        results.append(
            wrk.run_wrk(
                gw.base_url,
                "/v1/chat/completions",
                body(HOT),
                connections=conns,
                seconds=seconds,
                workdir=work,
                threads=1,
            )
        )

    threads = [threading.Thread(target=each, args=(gw, n)) for n, gw in enumerate(gateways)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r.rps for r in results)


def herd(ctx: Context, gateways: list[Gateway]) -> dict[str, Any]:
    n = ctx.pick(300, 100)

    async def spread() -> list[Reply | BaseException]:
        per = [n // GATEWAYS + (1 if i < n % GATEWAYS else 0) for i in range(GATEWAYS)]
        bursts = [
            load.burst(
                gw.base_url, post_request(gw.base_url, "/v1/chat/completions", body(COLD)), n=k, timeout=120
            )
            for gw, k in zip(gateways, per, strict=True)
        ]
        return [r for replies in await asyncio.gather(*bursts) for r in replies]

    t0 = time.perf_counter()
    replies = uvloop.run(spread())
    took = time.perf_counter() - t0
    store = gateways[0].store()
    try:
        launches = len(store.events(model=COLD, kind="launch"))
    finally:
        store.close()
    statuses: dict[str, int] = {}
    for r in replies:
        key = str(r.status) if isinstance(r, Reply) else type(r).__name__
        statuses[key] = statuses.get(key, 0) + 1
    ok = statuses.get("200", 0)
    return {"requests": n, "ok": ok, "statuses": statuses, "seconds": round(took, 3), "launches": launches}


def failover(gateways: list[Gateway]) -> dict[str, Any]:
    holder, followers = gateways[0], gateways[1:]
    store = holder.store()
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def keep_asking(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    status = client.post(f"{url}/v1/chat/completions", json=body(COLD)).status_code
                except httpx.HTTPError:
                    status = -1
                answers.append((time.monotonic(), status))

    threads = [
        threading.Thread(target=keep_asking, args=(gw.base_url,)) for gw in followers for _ in range(2)
    ]
    try:
        first = store.lease()
        assert first is not None
        reconciled_before = len(store.events(kind="reconciled"))
        for t in threads:
            t.start()
        time.sleep(2.0)
        holder.server.process.send_signal(signal.SIGKILL)  # by pid: its engine lives on
        holder.server.process.wait(timeout=30)
        killed = time.monotonic()
        until(lambda: (lease := store.lease()) is not None and lease.holder != first.holder)
        took_over = time.monotonic() - killed
        until(lambda: len(store.events(kind="reconciled")) > reconciled_before)  # the engine adopted
        reconciled = time.monotonic() - killed
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        launches = len(store.events(model=COLD, kind="launch"))
        adopted = [e.message for e in store.events(kind="reconciled")]
        store.close()
    ok_times = sorted(at for at, status in answers if status == 200)
    gaps = [b - a for a, b in itertools.pairwise(ok_times)]
    return {
        "lease_taken_over_s": round(took_over, 3),
        "reconciled_s": round(reconciled, 3),
        "answers": len(answers),
        "failed": sum(1 for _, s in answers if s != 200),
        "longest_gap_s": round(max(gaps, default=float("nan")), 3),
        "launches": launches,
        "reconciled": adopted,
    }


def until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{NAME}: the failover did not happen within {timeout:g}s")
        time.sleep(0.02)


def run(ctx: Context) -> BenchResult:
    with ExitStack() as stack:
        db_url, kind = database(stack, ctx.workdir)
        stub = stub_server(ctx.workdir, chunks=4)
        stack.callback(stub.stop)
        gateways = start_fleet(stack, ctx.workdir, stub.base_url, db_url)
        log.info("%s: three gateways on %s; throughput", NAME, kind)
        rps = throughput(ctx, gateways)
        log.info("%s: herd", NAME)
        crowd = herd(ctx, gateways)
        log.info("%s: kill -9 of the holder", NAME)
        fail = failover(gateways)
    raw = {"database": kind, "throughput": rps, "herd": crowd, "failover": fail}
    return BenchResult(NAME, rows=rows(raw), raw=raw)


def rows(raw: dict[str, Any]) -> list[Row]:
    rps, crowd, fail = raw["throughput"], raw["herd"], raw["failover"]
    return [
        Row(
            NAME,
            "RPS through 3 gateways / through 1",
            rps["rps_three"] / rps["rps_one"] if rps["rps_one"] else float("nan"),
            "x",
            baseline=f"1 gateway: {rps['rps_one']:.0f} RPS, c={CONNECTIONS}",
            subject=f"3 gateways: {rps['rps_three']:.0f} RPS, c={CONNECTIONS // GATEWAYS} each",
            note=f"{raw['database']}; one machine: the gateways, the stub and wrk share its cores",
        ),
        Row(
            NAME,
            f"herd of {crowd['requests']} over 3 gateways: last answer",
            crowd["seconds"],
            "s",
            baseline=f"engine ready {READY_AFTER:g} s after its start",
            subject=f"{crowd['ok']} answered 200, {crowd['launches']} launch(es)",
        ),
        Row(
            NAME,
            "herd over 3 gateways: launches",
            float(crowd["launches"]),
            baseline="single flight across the fleet",
            subject=f"{crowd['ok']} of {crowd['requests']} answered 200",
            target=Target("==", 1),
        ),
        Row(
            NAME,
            "kill -9 of the holder: lease taken over",
            fail["lease_taken_over_s"],
            "s",
            baseline=f"lease {LEASE_SECONDS:g} s (a holder dead on the same host is taken over at once)",
            subject=f"reconciled (engine adopted) after {fail['reconciled_s']} s",
            target=Target("<", LEASE_SECONDS, "s"),
        ),
        Row(
            NAME,
            "kill -9 of the holder: requests through the followers that failed",
            float(fail["failed"]),
            baseline=f"{fail['answers']} sent during the failover",
            subject=f"longest gap between answers {fail['longest_gap_s']} s; launches {fail['launches']}",
            target=Target("==", 0),
        ),
    ]
