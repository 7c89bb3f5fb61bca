"""One seed of the simulator: real gateways (create_app and its lifespan: controller, policies,
reaper, ledger, lease, SQLite store in a temp file) on a virtual-time loop, against SimCloud,
driven by the seed's plan, with the invariants checked after every step and at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from gateway.app import create_app
from state.writer import InlineExecutor
from tests.sim import actions, driver, schedules
from tests.sim.cloud import SimCloud
from tests.sim.dbfaults import DbFaults
from tests.sim.faults import Durations, FaultProfile
from tests.sim.invariants import Checker, Violation
from tests.sim.plan import (
    ADMIN_TOKEN,
    CHECK_EVERY,
    DRAIN,
    HEARTBEAT,
    LEASE,
    MAX_GATEWAYS,
    TICK,
    scenario,
)
from tests.sim.store_view import StoreView
from tests.sim.views import SimProvider
from tests.sim.vloop import SimBudgetExceeded, SimDeadlock, VirtualLoop, owned_context

RESTART_DELAY = 10.0  # a supervisor restarts a gateway this long after the last one went away
SHUTDOWN_LIMIT = 300.0  # a graceful shutdown that takes longer has hung
_DEPLOYMENT_ID = re.compile(r"\b[0-9a-f]{12}\b")
SETTLE = DRAIN + Durations().stop_max + 2 * TICK  # fault-free time before the final shutdown


@dataclass
class Gateway:
    name: str
    app: FastAPI
    provider: SimProvider
    db: DbFaults
    admin: driver.Admin
    holder: str
    created_at: float
    state: str = "standby"  # standby, serving, stopping, exited, killed
    started_at: float | None = None
    awake_since: float = 0.0  # the end of its last stall
    stalls: list[tuple[float, float]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class SimResult:
    seed: int
    steps: int
    virtual_seconds: float
    real_seconds: float
    faults: Counter[str]
    violations: list[Violation]
    trace_hash: str
    trace: list[str]


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The gateway logs every transition; thousands of seeds need none of it."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


class Sim:
    def __init__(
        self, seed: int, steps: int, *, only: frozenset[str] | None = None, real_budget: float = 300.0
    ) -> None:
        self.seed = seed
        self.scenario = scenario(seed, steps, only)
        self.real_budget = real_budget
        self.trace: list[str] = []
        self._aliases: dict[str, str] = {}
        self.gateways: list[Gateway] = []
        self.by_holder: dict[str, Gateway] = {}
        self.requests: list[driver.Request] = []
        self.models_seen: dict[str, None] = {}  # ordered: checks iterate it
        self.last_activity: dict[tuple[str, str], float] = {}  # (gateway, model): last request begin/end
        self.changed_at: dict[str, float] = {}
        self.keep_hot_patched: dict[str, float] = {}  # the highest keep-hot override sent, per model
        self.other_waiters: list[tuple[float, str, str]] = []  # admin loads and pre-warms
        self.after_hours_at: list[float] = []
        self.prewarm_at: list[float] = []
        self.step_index = -1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart: asyncio.TimerHandle | None = None

    # -- running ----------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        root = Path(tempfile.mkdtemp(prefix=f"llmgw-sim-{self.seed}-", dir=_tmp_root()))
        self.loop = VirtualLoop(real_budget_seconds=self.real_budget)
        self.loop.set_exception_handler(lambda _loop, _ctx: None)  # tasks of killed gateways
        self.cloud = SimCloud(
            self.loop,
            random.Random(f"cloud-{self.seed}"),
            faults=self.scenario.faults,
            capacity_gpus=self.scenario.capacity_gpus,
            heartbeat_interval=HEARTBEAT,
            holder_of=self._holder_name,
            alias=self.alias,
            trace=self.trace,
        )
        self.settings = self.scenario.settings(root)
        self.view = StoreView(root / "gateway.db", self.scenario.epoch)
        self.checker = Checker(self)
        try:
            with quiet_logs():
                self.loop.run_until_complete(self._main())
        except (SimDeadlock, SimBudgetExceeded) as exc:
            self.checker.flag("sim", type(exc).__name__, str(exc))
        finally:
            self._trace_events()
            result = self._result(started)  # taken before the reaping: nothing after it counts
            with quiet_logs():
                self._reap_killed()
            self._close()
            shutil.rmtree(root, ignore_errors=True)
        return result

    def _result(self, started: float) -> SimResult:
        return SimResult(
            seed=self.seed,
            steps=len(self.scenario.steps),
            virtual_seconds=self.loop.time(),
            real_seconds=time.perf_counter() - started,
            faults=Counter(self.cloud.injected),
            violations=list(self.checker.violations),
            trace_hash=hashlib.sha256("\n".join(self.trace).encode()).hexdigest(),
            trace=list(self.trace),
        )

    def _reap_killed(self) -> None:
        """The coroutines of killed gateways end here, with the seed's loop stopped, rather than
        when they are collected (in a later seed's loop, or at exit; see vloop.py). Whatever
        their `finally` blocks do now (log, write the trace) comes after the result. A killed
        gateway never reached Runtime.stop's `gc.unfreeze()` either: what its startup froze
        would stay out of the collector's reach for the rest of the process."""
        for owner in sorted(self.loop.killed):
            self.loop.reap(owner)
        if self.loop.killed:
            gc.unfreeze()

    async def _main(self) -> None:
        schedules.install(self)
        self.start_gateway()
        if self.scenario.standby:
            self.start_gateway()
        await self._until(lambda: self.checker.holder() is not None, limit=60)
        for i, step in enumerate(self.scenario.steps):
            self.step_index = i
            self.log(
                f"step {i} {step.kind} {step.model} n={step.n} u={step.u:.3f} v={step.value} {step.flag}"
            )
            actions.apply(self, step)
            await self.advance(step.dt)
            self.supervise()
            self.checker.after_step()
        await self.finish()

    async def advance(self, seconds: float) -> None:
        end = self.now() + seconds
        while self.now() < end:
            await asyncio.sleep(min(CHECK_EVERY, end - self.now()))
            self.checker.periodic()
            self.loop.check_budget()

    async def _until(self, condition: Callable[[], bool], *, limit: float) -> None:
        end = self.now() + limit
        while not condition() and self.now() < end:
            await asyncio.sleep(1.0)

    def now(self) -> float:
        return self.loop.time()

    def clock(self) -> datetime:
        return self.scenario.epoch + timedelta(seconds=self.loop.time())

    # -- trace ------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now():10.3f} {text}")

    def alias(self, deployment_id: str | None) -> str:
        if not deployment_id:
            return "-"
        if deployment_id not in self._aliases:
            self._aliases[deployment_id] = f"d{len(self._aliases) + 1}"
        return self._aliases[deployment_id]

    def scrub(self, text: str) -> str:
        """Deployment ids (random: uuid4) replaced by their aliases, so traces compare."""
        return _DEPLOYMENT_ID.sub(lambda m: self.alias(m.group()), text)

    def _trace_events(self) -> None:
        """The store's events go into the trace, with deployment ids replaced by their aliases."""
        for ev in self.view.events():
            message = self.scrub(ev.message)
            # no time: admin and pre-warm events are stamped with the wall clock
            self.trace.append(f"event {ev.kind} {ev.model} {self.alias(ev.deployment_id)} {message}")

    # -- gateways ---------------------------------------------------------------------------

    def start_gateway(self) -> Gateway:
        name = f"gw{len(self.gateways)}"
        provider = self.cloud.view(name)
        lost: list[Gateway] = []
        app = create_app(
            self.settings,
            provider=provider,
            clock=self.clock,
            on_lease_lost=lambda: self._lost(lost),
            db_executor=InlineExecutor(),
        )
        db = DbFaults(app.state.store.engine, self.now, lambda stmt: self.cloud.fault("db-error", name, stmt))
        gw = Gateway(
            name=name,
            app=app,
            provider=provider,
            db=db,
            admin=driver.Admin(app, ADMIN_TOKEN),
            holder=driver.lease_holder_id(app),
            created_at=self.now(),
        )
        lost.append(gw)
        self.gateways.append(gw)
        self.by_holder[gw.holder] = gw
        gw.task = self.loop.create_task(self._serve(gw), context=owned_context(name))
        self.log(f"{name} started")
        return gw

    async def _serve(self, gw: Gateway) -> None:
        phase = "startup"
        try:
            async with gw.app.router.lifespan_context(gw.app):
                phase = "running"
                gw.state = "serving"
                self.log(f"{gw.name} serving{' as a follower' if _follows(gw) else ''}")
                while _follows(gw) and not gw.stop.is_set():  # until it holds the lease, reconciled
                    await asyncio.sleep(0.05)
                if not gw.stop.is_set():
                    gw.started_at = self.now()  # it acts from here (the invariants' grace)
                    self.log(f"{gw.name} acting")
                await gw.stop.wait()
                gw.state, phase = "stopping", "shutdown"
                self.log(f"{gw.name} shutting down")
        except asyncio.CancelledError:
            if not gw.cancelled:
                self.checker.lifespan(gw, phase, asyncio.CancelledError("lifespan cancelled"))
        except Exception as exc:
            self.checker.lifespan(gw, phase, exc)
        finally:
            gw.state = "exited"
            self.log(f"{gw.name} exited")

    def _lost(self, gws: list[Gateway]) -> None:
        """on_lease_lost: what SIGTERM does to the real server (its lifespan ends)."""
        gw = gws[0]
        self.log(f"{gw.name} lost its lease: stopping")
        gw.stop.set()

    def _holder_name(self) -> str | None:
        lease = self.view.lease()
        if lease is None or lease[1] < self.now():
            return None
        gw = self.by_holder.get(lease[0])
        return gw.name if gw is not None else lease[0]

    def alive(self) -> list[Gateway]:
        return [g for g in self.gateways if g.state in ("standby", "serving", "stopping")]

    def supervise(self) -> None:
        """Like systemd: when no gateway runs or stands by, start one after RESTART_DELAY."""
        if self._restart is not None or len(self.gateways) >= MAX_GATEWAYS:
            return
        if any(g.state in ("standby", "serving") for g in self.gateways):
            return

        def restart() -> None:
            self._restart = None
            self.start_gateway()

        self._restart = self.loop.call_at(self.now() + RESTART_DELAY, restart)

    def front(self, u: float) -> Gateway | None:
        """The gateway a client reaches: the newest serving one, sometimes an older one that
        still serves (a load balancer does not know which one holds the lease)."""
        serving = [
            g
            for g in self.gateways
            if g.state == "serving" and g.name not in self.loop.frozen and not _follows(g)
        ]
        if not serving:
            return None
        return serving[-1] if u < 0.75 or len(serving) == 1 else serving[int(u * 4) % (len(serving) - 1)]

    def holder_gateway(self) -> Gateway | None:
        lease = self.view.lease()
        gw = self.by_holder.get(lease[0]) if lease is not None else None
        return gw if gw is not None and gw.state in ("standby", "serving", "stopping") else None

    # -- requests -----------------------------------------------------------------------------

    def open_requests(self) -> list[driver.Request]:
        killed = {g.name for g in self.gateways if g.state == "killed"}
        return [r for r in self.requests if r.phase != "done" and r.gateway not in killed]

    # -- the end ----------------------------------------------------------------------------

    async def finish(self) -> None:
        """No more faults; let what runs settle; shut every gateway down; check what is left."""
        self.step_index = len(self.scenario.steps)
        self.log("quiesce: no more faults")
        self.cloud.faults = FaultProfile()
        self.cloud.outage_until.clear()
        for gw in self.gateways:
            gw.db.clear()
            if gw.state != "killed" and gw.name in self.loop.frozen:
                # The quiesce cuts a stall short: the gateway is awake from now, as if its stall
                # had ended here (thawing it without that left the checker counting its idle
                # and schedule slack from before the stall: seed 18's idle-billing).
                self.log(f"{gw.name} wakes up (quiesce)")
                self.loop.thaw(gw.name)
                gw.awake_since = self.now()
                gw.stalls = [(start, min(end, self.now())) for start, end in gw.stalls]
        if self._restart is None and not any(g.state in ("standby", "serving") for g in self.gateways):
            self.start_gateway()
        await self._until(lambda: self.checker.holder() is not None, limit=3 * LEASE)
        await self.advance(SETTLE)
        self.checker.after_step()
        await self._shutdown_all()
        self.checker.final()

    async def _shutdown_all(self) -> None:
        self.log("shutdown")
        if self._restart is not None:
            self._restart.cancel()
        for gw in self.gateways:
            if gw.state == "standby" and gw.task is not None:
                gw.cancelled = True
                gw.task.cancel()
        for gw in self.gateways:
            if gw.state in ("serving", "stopping"):
                gw.stop.set()
        tasks = [gw.task for gw in self.gateways if gw.task is not None and gw.state != "killed"]
        if tasks:
            await asyncio.wait(tasks, timeout=SHUTDOWN_LIMIT)
        for gw in self.gateways:
            if gw.task is not None and not gw.task.done() and gw.state != "killed":
                self.checker.lifespan(gw, "shutdown", TimeoutError(f"not finished after {SHUTDOWN_LIMIT:g}s"))
                self.loop.kill(gw.name)
                gw.state = "killed"
        for rec in self.open_requests():
            rec.client_cancelled = True
            if rec.task is not None:
                rec.task.cancel()
        await asyncio.sleep(0)

    def _close(self) -> None:
        for gw in self.gateways:
            with contextlib.suppress(Exception):
                gw.app.state.store.engine.dispose()
        self.view.close()
        with contextlib.suppress(Exception):
            self.loop.close()


def _follows(gw: Gateway) -> bool:
    """A gateway that serves as a follower (another one held the lease when it started, and it
    has not acted since). The sim drives requests through the controller, which only a gateway
    that acts runs: followers get no traffic here (their routing is tested in tests/api/test_fleet.py)."""
    return bool(gw.app.state.runtime.follower.active)
