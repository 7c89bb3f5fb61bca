"""The steps of a plan applied to a running simulation (traffic, admin calls, faults), and the
requests and admin calls they start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from gateway.api.errors import GatewayError
from gateway.control.fleet import Route
from tests.sim import driver
from tests.sim.plan import LEASE, MAX_GATEWAYS, MODELS, PREWARM_MODELS, Step, write_reference
from tests.sim.vloop import owned_context

if TYPE_CHECKING:
    from tests.sim.sim import Gateway, Sim


def request(sim: Sim, step: Step) -> None:
    gw = sim.front(step.u)
    if gw is None:
        sim.log("no gateway serves: request refused")
        return
    spawn_request(sim, gw, step.model, stream=step.flag, hold=float(step.value))


def burst(sim: Sim, step: Step) -> None:
    gw = sim.front(0.0)
    for i in range(step.n if gw is not None else 0):
        assert gw is not None
        spawn_request(sim, gw, step.model, stream=i % 3 == 2, hold=float(step.value))


def disconnect(sim: Sim, step: Step) -> None:
    open_ = [r for r in sim.open_requests() if r.task is not None]
    if open_:
        rec = open_[int(step.u * len(open_))]
        rec.client_cancelled = True
        assert rec.task is not None
        rec.task.cancel()
        sim.log(f"req {rec.id} disconnects ({rec.phase})")


def advance(sim: Sim, step: Step) -> None:
    pass


def admin_load(sim: Sim, step: Step) -> None:
    gw = sim.front(0.0)
    if gw is not None:
        sim.other_waiters.append((sim.now(), gw.name, step.model))
        spawn_admin(sim, gw, f"load {step.model} wait={step.flag}", gw.admin.load(step.model, step.flag))


def admin_unload(sim: Sim, step: Step) -> None:
    gw = sim.front(0.0)
    if gw is not None:
        spawn_admin(sim, gw, f"unload {step.model}", gw.admin.unload(step.model))


def admin_patch(sim: Sim, step: Step) -> None:
    gw = sim.front(0.0)
    if gw is not None:
        sim.changed_at[step.model] = sim.now()
        keep_hot = step.value.get("keep_hot_seconds") if isinstance(step.value, dict) else None
        if keep_hot is not None:  # what an engine started now keeps once a reload unlists its model
            sim.keep_hot_patched[step.model] = max(keep_hot, sim.keep_hot_patched.get(step.model, 0.0))
        spawn_admin(sim, gw, f"patch {step.model} {step.value}", gw.admin.patch(step.model, step.value))


def admin_reload(sim: Sim, step: Step) -> None:
    gw = sim.front(0.0)
    if gw is not None:
        write_reference(sim.settings.model_reference, step.n)
        # Every model the reload may change, not only those requested: one only ever admin-loaded
        # changes too (seed 545: a pinned embed unlisted by the reload is idle-stopped from then
        # on, and was judged idle since its readiness).
        for model in [*MODELS, *sim.models_seen, *PREWARM_MODELS]:
            sim.changed_at[model] = sim.now()
        spawn_admin(sim, gw, f"reload variant {step.n}", gw.admin.reload())


def admin_reset(sim: Sim, step: Step) -> None:
    gw = sim.front(0.0)
    if gw is not None:
        spawn_admin(sim, gw, "reset", gw.admin.reset())


def engine_crash(sim: Sim, step: Step) -> None:
    ready = [c for c in sim.cloud.clusters.values() if c.engine == "ready"]
    if ready:
        cluster = ready[int(step.u * len(ready))]
        sim.cloud.fault("engine-crash", "-", cluster.name)
        sim.cloud.crash(cluster)


def preempt(sim: Sim, step: Step) -> None:
    clusters = list(sim.cloud.clusters.values())
    if clusters:
        cluster = clusters[int(step.u * len(clusters))]
        sim.cloud.fault("preempt", "-", cluster.name)
        sim.cloud.remove(cluster, "preempted")


def db_burst(sim: Sim, step: Step) -> None:
    gw = sim.holder_gateway() if step.flag else sim.front(0.0)
    if gw is not None:
        sim.cloud.fault("db-burst", gw.name, f"{step.n} statements")
        gw.db.burst(step.n)


def lease_loss(sim: Sim, step: Step) -> None:
    gw = sim.holder_gateway()
    if gw is not None:
        sim.cloud.fault("lease-loss", gw.name, f"database errors for {LEASE + 10:g}s")
        gw.db.window(LEASE + 10)


def stall(sim: Sim, step: Step) -> None:
    gw = sim.holder_gateway()
    if gw is None or gw.name in sim.loop.frozen:
        return
    sim.cloud.fault("stall", gw.name, f"{step.value:g}s")
    sim.loop.freeze(gw.name)
    gw.stalls.append((sim.now(), sim.now() + float(step.value)))
    for rec in sim.open_requests():
        if rec.gateway == gw.name:
            rec.stalled = True
    sim.loop.call_at(sim.now() + float(step.value), _thaw, sim, gw)


def _thaw(sim: Sim, gw: Gateway) -> None:
    if gw.state != "killed" and gw.name in sim.loop.frozen:
        sim.log(f"{gw.name} wakes up")
        sim.loop.thaw(gw.name)
        gw.awake_since = sim.now()


def kill(sim: Sim, step: Step) -> None:
    gw = sim.holder_gateway()
    if gw is not None:
        sim.cloud.fault("kill-9", gw.name, gw.state)
        sim.loop.kill(gw.name)
        gw.state = "killed"


def standby(sim: Sim, step: Step) -> None:
    if len(sim.alive()) < 2 and len(sim.gateways) < MAX_GATEWAYS:
        sim.start_gateway()


def list_outage(sim: Sim, step: Step) -> None:
    sim.cloud.fault("list-outage", "-", f"{step.value:g}s")
    sim.cloud.outage_until["list"] = sim.now() + float(step.value)


def heartbeat_outage(sim: Sim, step: Step) -> None:
    sim.cloud.fault("heartbeat-outage", "-", f"{step.value:g}s")
    sim.cloud.outage_until["heartbeat"] = sim.now() + float(step.value)


def spawn_request(sim: Sim, gw: Gateway, model: str, *, stream: bool, hold: float) -> None:
    rec = driver.Request(
        id=len(sim.requests), gateway=gw.name, model=model, stream=stream, hold=hold, started=sim.now()
    )
    sim.requests.append(rec)
    sim.models_seen[model] = None
    rec.task = sim.loop.create_task(_run_request(sim, gw, rec), context=owned_context(gw.name))


def _serves(sim: Sim, route: Route) -> bool:
    cluster = sim.cloud.cluster_of_endpoint(route.base_url)
    return sim.cloud.serves(cluster, route.deployment_id, route.base_url)


async def _run_request(sim: Sim, gw: Gateway, rec: driver.Request) -> None:
    error: BaseException | None = None
    try:
        await driver.request(gw.app, rec, serves=lambda route: _serves(sim, route), now=sim.now)
        rec.outcome = "ok"
    except asyncio.CancelledError as exc:
        error, rec.outcome = exc, "disconnected" if rec.client_cancelled else "CancelledError"
    except GatewayError as exc:
        error, rec.outcome = exc, f"{exc.status} {exc.code}"
    except Exception as exc:
        error, rec.outcome = exc, type(exc).__name__
    sim.checker.request_outcome(rec, error)
    if rec.phase == "in-flight":
        sim.last_activity[(rec.gateway, rec.model)] = sim.now()
    rec.phase = "done"
    waited = (rec.wait_ended or sim.now()) - rec.wait_started if rec.wait_started is not None else 0.0
    sim.log(
        f"req {rec.id} {rec.gateway} {rec.model} {'stream' if rec.stream else 'plain'} -> {rec.outcome} "
        f"(waited {waited:.1f}s, {sim.alias(rec.deployment_id)})"
    )


def spawn_admin(sim: Sim, gw: Gateway, what: str, call: Awaitable[driver.AdminReply]) -> None:
    async def run() -> None:
        try:
            reply = await call
        except BaseException as exc:  # what the client's HTTP library would see: no response
            sim.checker.admin_reply(gw, what, None, False, type(exc).__name__)
            sim.log(f"admin {gw.name} {what} -> {type(exc).__name__}")
            return
        sim.checker.admin_reply(gw, what, reply.status, reply.envelope, "")
        sim.log(f"admin {gw.name} {what} -> {reply.status}")

    task = sim.loop.create_task(run(), context=owned_context(gw.name))
    sim._tasks.add(task)
    task.add_done_callback(sim._tasks.discard)


ACTIONS = {
    "request": request,
    "burst": burst,
    "disconnect": disconnect,
    "advance": advance,
    "admin-load": admin_load,
    "admin-unload": admin_unload,
    "admin-patch": admin_patch,
    "admin-reload": admin_reload,
    "admin-reset": admin_reset,
    "engine-crash": engine_crash,
    "preempt": preempt,
    "db-burst": db_burst,
    "lease-loss": lease_loss,
    "stall": stall,
    "kill": kill,
    "standby": standby,
    "list-outage": list_outage,
    "heartbeat-outage": heartbeat_outage,
}


def apply(sim: Sim, step: Step) -> None:
    ACTIONS[step.kind](sim, step)
