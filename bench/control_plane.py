"""Benchmark 4: the control loop at scale: 10,000 models in the reference file and 1,000 live
deployments (FakeProvider, SQLite file in a temporary directory), then the time of one
`Reaper.tick(now)` with a fake clock.

Three kinds of tick are timed: *quiet* (nothing was used since the previous tick), *wake-up*
(the first tick after every one of the 1,000 idle models served a request: each deployment's
cost interval turns from idle to serving) and *busy* (the ticks after that, every model still
serving: the tick writes 1,000 last-used times). The baseline is a quiet tick of the same
gateway before any deployment exists.

Each figure is the CPU time of the event loop's thread during the tick (`time.thread_time()`):
what the tick holds the loop for, every request waiting meanwhile. Work handed to the database
writer's thread is not in it; the tick's wall time (which includes waiting for the writer) is in
the note. Issue 11's bar: nothing holds the loop for more than 1 ms.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import uvloop

from bench.gateway_proc import ADMIN_TOKEN
from bench.report import BenchResult, Row, Target
from bench.stats import median
from bench.suite import Context
from gateway.app import create_app
from gateway.config.settings import Settings
from state import ModelRecord
from tests.fakes import FakeProvider

NAME = "control_plane"
TICK_TARGET_MS = 1.0
TICK_SECONDS = 2.0  # the default reaper interval: how far the fake clock moves per tick


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)  # a Monday afternoon: no schedule fires

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def run(ctx: Context) -> BenchResult:
    models = ctx.pick(10_000, 2_000)
    live = ctx.pick(1_000, 100)
    ticks = ctx.pick(15, 4)
    busy_ticks = ctx.pick(6, 3)  # the first is the wake-up tick
    reference = ctx.workdir / "model_reference.json"
    reference.write_text(json.dumps({f"org/model-{i:05d}": {} for i in range(models)}))
    settings = Settings(
        data_dir=ctx.workdir / "data",
        model_reference=reference,
        admin_token=ADMIN_TOKEN,
        client_auth="open",
        after_hours=None,
        reaper_interval_seconds=3600,  # ticks are called here, not by the loop
        local={"gpu_ids": ["0"]},
    )
    raw = uvloop.run(measure(settings, models=models, live=live, ticks=ticks, busy_ticks=busy_ticks))
    base, quiet, busy = raw["baseline_tick_ms"], raw["quiet_tick_ms"], raw["busy_tick_ms"]
    wall_quiet, wall_busy = raw["quiet_tick_wall_ms"], raw["busy_tick_wall_ms"]
    scale = f"{models:,} models, {live:,} live deployments"
    target = Target("<=", TICK_TARGET_MS, "ms")
    rows = [
        Row(
            NAME,
            "reaper tick on the loop, quiet",
            median(quiet),
            "ms",
            baseline=f"no deployments {median(base):.2f} ms",
            subject=scale,
            target=target,
            note=f"loop-thread CPU, median of {len(quiet)}; max {max(quiet):.1f} ms; wall {median(wall_quiet):.1f} ms",
        ),
        Row(
            NAME,
            "reaper tick on the loop, wake-up",
            busy[0],
            "ms",
            baseline=f"quiet {median(quiet):.2f} ms",
            subject=f"{live:,} idle models all used since last tick",
            target=target,
            note=f"one tick; every deployment's cost interval turns from idle to serving; wall {wall_busy[0]:.1f} ms",
        ),
        Row(
            NAME,
            "reaper tick on the loop, busy",
            median(busy[1:]),
            "ms",
            baseline=f"quiet {median(quiet):.2f} ms",
            subject=f"{live:,} models used since last tick",
            target=target,
            note=f"median of {len(busy) - 1}; max {max(busy[1:]):.1f} ms; wall {median(wall_busy[1:]):.1f} ms; "
            "the tick writes the last-used times of every model used since the previous one",
        ),
        Row(
            NAME,
            "cold starts with FakeProvider",
            raw["launch_ms_each"],
            "ms each",
            baseline=f"startup with {models:,} models {raw['startup_s']:.2f} s",
            subject=f"{live:,} launches in {raw['launches_s']:.1f} s",
            note="control-plane cost of one launch (store writes, events, ledger), no engine",
        ),
    ]
    return BenchResult(NAME, rows=rows, raw=raw)


async def measure(
    settings: Settings, *, models: int, live: int, ticks: int, busy_ticks: int
) -> dict[str, Any]:
    """Build the gateway's parts in-process (its startup writes, without its background loop),
    launch `live` deployments, then time ticks. Nothing is torn down at the end: the fake
    provider holds no process, and the SQLite file goes with the temporary directory."""
    clock = FakeClock()
    app = create_app(settings, provider=FakeProvider(), clock=clock)
    store, controller, reaper, catalog = (
        app.state.store,
        app.state.controller,
        app.state.reaper,
        app.state.catalog,
    )
    t0 = time.perf_counter()
    store.create_all()
    store.upsert_models(
        ModelRecord(id=s.id, gpus_per_replica=s.gpus_per_replica, priority=s.priority, kind=s.kind)
        for s in catalog.specs.values()
    )
    startup = time.perf_counter() - t0
    try:
        reaper.last_tick = clock()
        baseline = [(await _timed_tick(reaper, clock))[0] for _ in range(ticks)]
        specs = list(catalog.specs.values())[:live]
        t0 = time.perf_counter()
        for spec in specs:
            await controller.ensure_ready(spec)
        launches = time.perf_counter() - t0
        assert len(controller.routes) == live, f"{len(controller.routes)} of {live} deployments ready"
        await _timed_tick(reaper, clock)  # flushes what the launches left
        quiet = [await _timed_tick(reaper, clock) for _ in range(ticks)]
        busy = []
        for _ in range(busy_ticks):
            now = clock.advance(0.5)
            for spec in specs:  # one request per model since the previous tick
                controller.activity.begin(spec.id, now)
                controller.activity.end(spec.id, now)
            busy.append(await _timed_tick(reaper, clock))
    finally:
        store.close()
    return {
        "models": models,
        "live_deployments": live,
        "startup_s": round(startup, 3),
        "launches_s": round(launches, 2),
        "launch_ms_each": round(1000 * launches / live, 2),
        "baseline_tick_ms": baseline,
        "quiet_tick_ms": [cpu for cpu, _ in quiet],
        "quiet_tick_wall_ms": [wall for _, wall in quiet],
        "busy_tick_ms": [cpu for cpu, _ in busy],
        "busy_tick_wall_ms": [wall for _, wall in busy],
    }


async def _timed_tick(reaper: Any, clock: FakeClock) -> tuple[float, float]:
    """(loop-thread CPU ms, wall ms) of one tick."""
    now = clock.advance(TICK_SECONDS)
    t0, cpu0 = time.perf_counter(), time.thread_time()
    await reaper.tick(now)
    cpu, elapsed = (time.thread_time() - cpu0) * 1000, (time.perf_counter() - t0) * 1000
    await asyncio.sleep(0)
    return round(cpu, 3), round(elapsed, 3)
