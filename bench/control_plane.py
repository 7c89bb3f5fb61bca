"""Benchmark 4: the control loop at scale: 10,000 models in the reference file and 1,000 live
deployments (FakeProvider, SQLite file in a temporary directory), then the time of one
`Reaper.tick(now)` with a fake clock.

Three kinds of tick are timed: *quiet* (nothing was used since the previous tick), *wake-up*
(the first tick after every one of the 1,000 idle models served a request: each deployment's
cost interval turns from idle to serving) and *busy* (the ticks after that, every model still
serving: the tick writes 1,000 last-used times). The baseline is a quiet tick of the same
gateway before any deployment exists.

Each figure is the longest the tick holds the event loop at a stretch (a task yielding in a
loop meanwhile sees it as its longest gap): what a request arriving during the tick waits at
most. The tick's CPU time on the loop's thread (`time.thread_time()`, from other ticks) and its
wall time (which includes waiting for the database writer) are in the notes. The bar: nothing
holds the loop for more than 1 ms.
"""

from __future__ import annotations

import asyncio
import json
import math
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
    busy_ticks = ctx.pick(7, 3)  # the first is the wake-up tick
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
    scale = f"{models:,} models, {live:,} live deployments"
    target = Target("<=", TICK_TARGET_MS, "ms")
    base_cpu, quiet_cpu, busy_cpu = raw["baseline_tick_ms"], raw["quiet_tick_ms"], raw["busy_tick_ms"]
    rows = [
        Row(
            NAME,
            "longest loop hold in a tick, quiet",
            max(raw["quiet_hold_ms"]),
            "ms",
            baseline=f"no deployments {max(raw['baseline_hold_ms']):.2f} ms",
            subject=scale,
            target=target,
            note=f"max of {len(raw['quiet_hold_ms'])} ticks; the tick's loop-thread CPU "
            f"{median(quiet_cpu):.1f} ms (no deployments {median(base_cpu):.2f} ms), "
            f"wall {median(raw['quiet_tick_wall_ms']):.1f} ms",
        ),
        Row(
            NAME,
            "longest loop hold in a tick, wake-up",
            raw["wakeup_hold_ms"],
            "ms",
            baseline=f"quiet {max(raw['quiet_hold_ms']):.2f} ms",
            subject=f"{live:,} idle models all used since last tick",
            target=target,
            note=f"one tick; every deployment's cost interval turns from idle to serving; wall {raw['wakeup_wall_ms']:.1f} ms",
        ),
        Row(
            NAME,
            "longest loop hold in a tick, busy",
            max(raw["busy_hold_ms"]),
            "ms",
            baseline=f"quiet {max(raw['quiet_hold_ms']):.2f} ms",
            subject=f"{live:,} models used since last tick",
            target=target,
            note=f"max of {len(raw['busy_hold_ms'])}; loop-thread CPU {median(busy_cpu):.1f} ms; "
            f"wall {median(raw['busy_tick_wall_ms']):.1f} ms; the tick writes the last-used times of every model used",
        ),
        Row(
            NAME,
            "longest loop-thread CPU at a stretch in a tick",
            max(raw["hold_cpu_ms"]),
            "ms",
            baseline=f"no deployments {max(raw['baseline_hold_cpu_ms']):.2f} ms",
            subject=scale,
            target=target,
            note="quiet, wake-up and busy ticks: the CPU the loop's thread spent between two turns of "
            "the probe, i.e. a hold without the time the OS or the writer's thread (GIL) took; on a "
            "loaded machine the wall-clock holds above are mostly that time",
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
    launch `live` deployments, then time ticks. The gateway's shutdown stops them (the fake
    provider holds no process; the SQLite file goes with the temporary directory)."""
    clock = FakeClock()
    app = create_app(settings, provider=FakeProvider(), clock=clock)
    controller, reaper, catalog = app.state.controller, app.state.reaper, app.state.catalog
    t0 = time.perf_counter()
    async with app.router.lifespan_context(app):  # takes the lease: the control loop may act
        startup = time.perf_counter() - t0
        reaper.last_tick = clock()
        baseline = [await _timed_tick(reaper, clock, probe=n % 2 == 1) for n in range(ticks)]
        specs = list(catalog.specs.values())[:live]
        t0 = time.perf_counter()
        for spec in specs:
            await controller.ensure_ready(spec)
        launches = time.perf_counter() - t0
        assert len(controller.routes) == live, f"{len(controller.routes)} of {live} deployments ready"
        await _timed_tick(reaper, clock)  # flushes what the launches left
        quiet = [await _timed_tick(reaper, clock, probe=n % 2 == 1) for n in range(ticks)]
        busy: list[Tick] = []
        for _ in range(busy_ticks):
            now = clock.advance(0.5)
            for spec in specs:  # one request per model since the previous tick
                controller.activity.begin(spec.id, now)
                controller.activity.end(spec.id, now)
            busy.append(await _timed_tick(reaper, clock, probe=len(busy) % 2 == 0))
    return {
        "models": models,
        "live_deployments": live,
        "startup_s": round(startup, 3),
        "launches_s": round(launches, 2),
        "launch_ms_each": round(1000 * launches / live, 2),
        "baseline_tick_ms": _cpu(baseline),
        "baseline_hold_ms": _holds(baseline),
        "quiet_tick_ms": _cpu(quiet),
        "quiet_hold_ms": _holds(quiet),
        "quiet_tick_wall_ms": [wall for _, wall, _, _ in quiet],
        "wakeup_hold_ms": busy[0][2],
        "hold_cpu_ms": _holds_cpu([*quiet, *busy]),
        "baseline_hold_cpu_ms": _holds_cpu(baseline),
        "wakeup_wall_ms": busy[0][1],
        "busy_tick_ms": _cpu(busy[1:]),
        "busy_hold_ms": _holds(busy[1:]),
        "busy_tick_wall_ms": [wall for _, wall, _, _ in busy[1:]],
    }


# (loop-thread CPU ms, wall ms, longest loop hold ms, the loop thread's CPU in that hold ms)
Tick = tuple[float, float, float, float]


def _cpu(ticks: list[Tick]) -> list[float]:
    return [cpu for cpu, _, _, _ in ticks if not math.isnan(cpu)]


def _holds(ticks: list[Tick]) -> list[float]:
    return [hold for _, _, hold, _ in ticks if not math.isnan(hold)]


def _holds_cpu(ticks: list[Tick]) -> list[float]:
    return [hold for _, _, _, hold in ticks if not math.isnan(hold)]


async def _timed_tick(reaper: Any, clock: FakeClock, *, probe: bool = False) -> Tick:
    """(loop-thread CPU ms, wall ms, longest loop hold ms) of one tick. The hold is measured by a
    task that yields in a loop (the longest gap between two of its turns: what a request arriving
    during the tick waits at most); it spins while the tick waits, so such a tick's CPU is not
    reported (nan) and CPU comes from ticks without the probe."""
    now = clock.advance(TICK_SECONDS)
    gaps: list[tuple[float, float]] = []  # (wall, loop-thread CPU) between two turns
    running = True

    async def turns() -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while running:
            await asyncio.sleep(0)
            t, t_cpu = time.perf_counter(), time.thread_time()
            gaps.append((t - last, t_cpu - last_cpu))
            last, last_cpu = t, t_cpu

    task = asyncio.create_task(turns()) if probe else None
    await asyncio.sleep(0)
    t0, cpu0 = time.perf_counter(), time.thread_time()
    await reaper.tick(now)
    cpu, elapsed = (time.thread_time() - cpu0) * 1000, (time.perf_counter() - t0) * 1000
    running = False
    if task is not None:
        await task
    await asyncio.sleep(0)
    hold = max(g for g, _ in gaps) * 1000 if gaps else math.nan
    hold_cpu = max(c for _, c in gaps) * 1000 if gaps else math.nan
    return (math.nan if probe else round(cpu, 3)), round(elapsed, 3), round(hold, 3), round(hold_cpu, 3)
