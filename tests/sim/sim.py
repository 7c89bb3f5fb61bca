"""One seed of the simulator: real gateways (create_app and its lifespan: controller, policies,
reaper, ledger, lease, SQLite store in a temp file) on a virtual-time loop, against SimCloud,
driven by the seed's plan, with the invariants checked after every step and at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from croniter import croniter
from fastapi import FastAPI

from gateway.api.errors import GatewayError
from gateway.app import create_app
from gateway.control.fleet import Route
from tests.sim import driver
from tests.sim.cloud import Durations, FaultProfile, SimProvider, World
from tests.sim.dbfaults import DbFaults
from tests.sim.invariants import Checker, Violation
from tests.sim.plan import (
    ADMIN_TOKEN,
    AFTER_HOURS_CRON,
    CHECK_EVERY,
    DRAIN,
    HEARTBEAT,
    LEASE,
    PREWARM_CRON,
    PREWARM_MODELS,
    TICK,
    Step,
    scenario,
    write_reference,
)
from tests.sim.store_view import TERMINAL, StoreView
from tests.sim.vloop import SimBudgetExceeded, SimDeadlock, VirtualLoop, owned_context

RESTART_DELAY = 10.0  # a supervisor restarts a gateway this long after the last one went away
MAX_GATEWAYS = 6
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
    def __init__(self, seed: int, steps: int, *, real_budget: float = 120.0) -> None:
        self.seed = seed
        self.scenario = scenario(seed, steps)
        self.real_budget = real_budget
        self.trace: list[str] = []
        self._aliases: dict[str, str] = {}
        self.gateways: list[Gateway] = []
        self.by_holder: dict[str, Gateway] = {}
        self.requests: list[driver.Request] = []
        self.models_seen: dict[str, None] = {}  # ordered: checks iterate it
        self.last_request_end: dict[tuple[str, str | None], float] = {}
        self.changed_at: dict[str, float] = {}
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
        self.world = World(
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
            self._close()
            shutil.rmtree(root, ignore_errors=True)
        return SimResult(
            seed=self.seed,
            steps=len(self.scenario.steps),
            virtual_seconds=self.loop.time(),
            real_seconds=time.perf_counter() - started,
            faults=self.world.injected,
            violations=self.checker.violations,
            trace_hash=hashlib.sha256("\n".join(self.trace).encode()).hexdigest(),
            trace=self.trace,
        )

    async def _main(self) -> None:
        self._schedule_firings()
        self.start_gateway()
        if self.scenario.standby:
            self.start_gateway()
        await self._until(lambda: self.checker.holder() is not None, limit=60)
        for i, step in enumerate(self.scenario.steps):
            self.step_index = i
            self.log(
                f"step {i} {step.kind} {step.model} n={step.n} u={step.u:.3f} v={step.value} {step.flag}"
            )
            self.apply(step)
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
        provider = self.world.view(name)
        lost: list[Gateway] = []
        app = create_app(
            self.settings, provider=provider, clock=self.clock, on_lease_lost=lambda: self._lost(lost)
        )
        db = DbFaults(app.state.store.engine, self.now, lambda stmt: self.world.fault("db-error", name, stmt))
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
                gw.state, gw.started_at = "serving", self.now()
                self.log(f"{gw.name} serving")
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
        serving = [g for g in self.gateways if g.state == "serving" and g.name not in self.loop.frozen]
        if not serving:
            return None
        return serving[-1] if u < 0.75 or len(serving) == 1 else serving[int(u * 4) % (len(serving) - 1)]

    def holder_gateway(self) -> Gateway | None:
        lease = self.view.lease()
        gw = self.by_holder.get(lease[0]) if lease is not None else None
        return gw if gw is not None and gw.state in ("standby", "serving", "stopping") else None

    # -- schedules --------------------------------------------------------------------------

    def _schedule_firings(self) -> None:
        start = self.scenario.epoch
        horizon = start + timedelta(hours=6)
        for cron, out in ((AFTER_HOURS_CRON, self.after_hours_at), (PREWARM_CRON, self.prewarm_at)):
            it = croniter(cron, start)
            while (at := it.get_next(datetime)) < horizon:
                out.append((at - start).total_seconds())
        for firing in self.after_hours_at:
            self.loop.call_at(firing, self._after_hours_fired, firing)
        for firing in self.prewarm_at:
            self.loop.call_at(firing, self._prewarm_fired)

    def _after_hours_fired(self, firing: float) -> None:
        live = {c.deployment_id for c in self.world.clusters.values()}
        live |= {r.id for r in self.view.rows() if r.state not in TERMINAL}
        self.log(f"after hours fired ({len(live)} live deployments)")
        deadline = firing + TICK + DRAIN + self.world.durations.stop_max + TICK
        self.loop.call_at(deadline, self.checker.after_hours, firing, live)

    def _prewarm_fired(self) -> None:
        holder = self.holder_gateway()
        for model in PREWARM_MODELS:
            self.other_waiters.append((self.now(), holder.name if holder else "-", model))

    # -- steps ------------------------------------------------------------------------------

    def apply(self, step: Step) -> None:
        handler = getattr(self, "_do_" + step.kind.replace("-", "_"))
        handler(step)

    def _do_request(self, step: Step) -> None:
        gw = self.front(step.u)
        if gw is None:
            self.log("no gateway serves: request refused")
            return
        self.spawn_request(gw, step.model, stream=step.flag, hold=float(step.value))

    def _do_burst(self, step: Step) -> None:
        gw = self.front(0.0)
        for i in range(step.n if gw is not None else 0):
            assert gw is not None
            self.spawn_request(gw, step.model, stream=i % 3 == 2, hold=float(step.value))

    def _do_disconnect(self, step: Step) -> None:
        open_ = [r for r in self.open_requests() if r.task is not None]
        if open_:
            rec = open_[int(step.u * len(open_))]
            rec.client_cancelled = True
            assert rec.task is not None
            rec.task.cancel()
            self.log(f"req {rec.id} disconnects ({rec.phase})")

    def _do_advance(self, step: Step) -> None:
        pass

    def _do_admin_load(self, step: Step) -> None:
        gw = self.front(0.0)
        if gw is not None:
            self.other_waiters.append((self.now(), gw.name, step.model))
            self.spawn_admin(gw, f"load {step.model} wait={step.flag}", gw.admin.load(step.model, step.flag))

    def _do_admin_unload(self, step: Step) -> None:
        gw = self.front(0.0)
        if gw is not None:
            self.spawn_admin(gw, f"unload {step.model}", gw.admin.unload(step.model))

    def _do_admin_patch(self, step: Step) -> None:
        gw = self.front(0.0)
        if gw is not None:
            self.changed_at[step.model] = self.now()
            self.spawn_admin(gw, f"patch {step.model} {step.value}", gw.admin.patch(step.model, step.value))

    def _do_admin_reload(self, step: Step) -> None:
        gw = self.front(0.0)
        if gw is not None:
            write_reference(self.settings.model_reference, step.n)
            for model in [*self.models_seen, *PREWARM_MODELS]:
                self.changed_at[model] = self.now()
            self.spawn_admin(gw, f"reload variant {step.n}", gw.admin.reload())

    def _do_admin_reset(self, step: Step) -> None:
        gw = self.front(0.0)
        if gw is not None:
            self.spawn_admin(gw, "reset", gw.admin.reset())

    def _do_engine_crash(self, step: Step) -> None:
        ready = [c for c in self.world.clusters.values() if c.engine == "ready"]
        if ready:
            cluster = ready[int(step.u * len(ready))]
            self.world.fault("engine-crash", "-", cluster.name)
            self.world.crash(cluster)

    def _do_preempt(self, step: Step) -> None:
        clusters = list(self.world.clusters.values())
        if clusters:
            cluster = clusters[int(step.u * len(clusters))]
            self.world.fault("preempt", "-", cluster.name)
            self.world.remove(cluster, "preempted")

    def _do_db_burst(self, step: Step) -> None:
        gw = self.holder_gateway() if step.flag else self.front(0.0)
        if gw is not None:
            self.world.fault("db-burst", gw.name, f"{step.n} statements")
            gw.db.burst(step.n)

    def _do_lease_loss(self, step: Step) -> None:
        gw = self.holder_gateway()
        if gw is not None:
            self.world.fault("lease-loss", gw.name, f"database errors for {LEASE + 10:g}s")
            gw.db.window(LEASE + 10)

    def _do_stall(self, step: Step) -> None:
        gw = self.holder_gateway()
        if gw is None or gw.name in self.loop.frozen:
            return
        self.world.fault("stall", gw.name, f"{step.value:g}s")
        self.loop.freeze(gw.name)
        for rec in self.open_requests():
            if rec.gateway == gw.name:
                rec.stalled = True
        self.loop.call_at(self.now() + float(step.value), self._thaw, gw)

    def _thaw(self, gw: Gateway) -> None:
        if gw.state != "killed":
            self.log(f"{gw.name} wakes up")
            self.loop.thaw(gw.name)

    def _do_kill(self, step: Step) -> None:
        gw = self.holder_gateway()
        if gw is not None:
            self.world.fault("kill-9", gw.name, gw.state)
            self.loop.kill(gw.name)
            gw.state = "killed"

    def _do_standby(self, step: Step) -> None:
        if len(self.alive()) < 2 and len(self.gateways) < MAX_GATEWAYS:
            self.start_gateway()

    def _do_list_outage(self, step: Step) -> None:
        self.world.fault("list-outage", "-", f"{step.value:g}s")
        self.world.outage_until["list"] = self.now() + float(step.value)

    def _do_heartbeat_outage(self, step: Step) -> None:
        self.world.fault("heartbeat-outage", "-", f"{step.value:g}s")
        self.world.outage_until["heartbeat"] = self.now() + float(step.value)

    # -- requests and admin calls -----------------------------------------------------------

    def open_requests(self) -> list[driver.Request]:
        killed = {g.name for g in self.gateways if g.state == "killed"}
        return [r for r in self.requests if r.phase != "done" and r.gateway not in killed]

    def spawn_request(self, gw: Gateway, model: str, *, stream: bool, hold: float) -> None:
        rec = driver.Request(
            id=len(self.requests), gateway=gw.name, model=model, stream=stream, hold=hold, started=self.now()
        )
        self.requests.append(rec)
        self.models_seen[model] = None
        rec.task = self.loop.create_task(self._run_request(gw, rec), context=owned_context(gw.name))

    def _serves(self, route: Route) -> bool:
        cluster = self.world.cluster_of_endpoint(route.base_url)
        return self.world.serves(cluster, route.deployment_id, route.base_url)

    async def _run_request(self, gw: Gateway, rec: driver.Request) -> None:
        error: BaseException | None = None
        try:
            await driver.request(gw.app, rec, serves=self._serves, now=self.now)
            rec.outcome = "ok"
        except asyncio.CancelledError as exc:
            error, rec.outcome = exc, "disconnected" if rec.client_cancelled else "CancelledError"
        except GatewayError as exc:
            error, rec.outcome = exc, f"{exc.status} {exc.code}"
        except Exception as exc:
            error, rec.outcome = exc, type(exc).__name__
        self.checker.request_outcome(rec, error)
        rec.phase = "done"
        if rec.endpoint is not None:
            cluster = self.world.cluster_of_endpoint(rec.endpoint)
            self.last_request_end[(cluster, rec.deployment_id)] = self.now()
        waited = (rec.wait_ended or self.now()) - rec.wait_started if rec.wait_started is not None else 0.0
        self.log(
            f"req {rec.id} {rec.gateway} {rec.model} {'stream' if rec.stream else 'plain'} -> {rec.outcome} "
            f"(waited {waited:.1f}s, {self.alias(rec.deployment_id)})"
        )

    def spawn_admin(self, gw: Gateway, what: str, call: Awaitable[driver.AdminReply]) -> None:
        async def run() -> None:
            try:
                reply = await call
            except BaseException as exc:  # what the client's HTTP library would see: no response
                self.checker.admin_reply(gw, what, None, False, type(exc).__name__)
                self.log(f"admin {gw.name} {what} -> {type(exc).__name__}")
                return
            self.checker.admin_reply(gw, what, reply.status, reply.envelope, "")
            self.log(f"admin {gw.name} {what} -> {reply.status}")

        task = self.loop.create_task(run(), context=owned_context(gw.name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the end ----------------------------------------------------------------------------

    async def finish(self) -> None:
        """No more faults; let what runs settle; shut every gateway down; check what is left."""
        self.step_index = len(self.scenario.steps)
        self.log("quiesce: no more faults")
        self.world.faults = FaultProfile()
        self.world.outage_until.clear()
        for gw in self.gateways:
            gw.db.clear()
            if gw.state != "killed":
                self.loop.thaw(gw.name)
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
