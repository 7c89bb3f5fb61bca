"""The invariants, checked after every step, every few virtual seconds, and at the end.

- world-owned: every engine the cloud runs belongs to exactly one live deployment row;
- owner-alive: every live row is owned by the live lease holder (held in its controller);
- stale-route: the holder routes only to READY deployments;
- replicas: the holder serves at most replicas.max replicas of a model and starts at most one
  of them at a time;
- in-flight: each controller counts exactly the requests that are open against it;
- request-wait: no request waits longer than the bound below;
- queue-full: 503 queue_full only when max_waiting_requests clients really wait;
- client-error / admin-error: a request ends with a route or an OpenAI error (a GatewayError;
  admin calls: an envelope), never a bare exception;
- idle-billing: no engine billed idle past its keep-hot time, plus its spare time for a model
  with `spare_seconds` (pinned ones excepted, while the catalog lists their model);
- after-hours: what ran at an after-hours firing is gone by the deadline below (when one lease
  holder saw the firing and stayed up);
- ledger-overlap / ledger-sum: per cluster, cost intervals do not overlap and add up to the time
  the cloud ran it;
- fencing: every provider side effect (launch, swap, stop, heartbeat) comes from the gateway that
  holds a valid lease at that moment;
- schedule-replay: schedule actions happen only within a tick of a firing;
- lifespan / lease-released / final-state: startup and shutdown raise nothing and finish; a
  gateway that shut down released the lease; after the last shutdown nothing runs, every row is
  terminal and every cost interval closed.

Slack, and why (all virtual seconds, see plan.py for the values):
- a request waits at most COLD_START_TIMEOUT + DRAIN + STOP_MAX + 2 TICK: the timeout, the drain
  of a takeover victim or of the model's previous engine, the stop of a failed start (waiters are
  answered once it returns; STOP_MAX is the longest stop without a fault), and two reaper ticks
  for starts the reaper makes (pre-warm);
- an idle engine goes within its keep-hot time + TICK (the reaper sees it) + STOP_MAX + TICK;
  one kept as a spare within that + its spare time + TICK (the tick that sees it expire);
- after an after-hours firing: + TICK (the tick that sees it) + DRAIN + STOP_MAX + TICK;
- schedule actions: within TICK + 2 s of the firing (+ CHECK_EVERY for pre-warm events, which
  the gateway stamps with the wall clock, so the checker dates them when it sees them);
- the ledger matches the world within 2 TICK + 1 s, plus HEARTBEAT + TICK for a cluster that
  vanished without a stop (preempted, failsafe): the next heartbeat is how anyone can know; plus,
  for a cluster that went while no live gateway held the lease (or the holder's database
  refused every statement, so it could record nothing), the length of that unwatched
  stretch (the new holder can only guess when in it the cluster went; a cluster that went while
  a holder watched gets no such slack, however long nobody watched later);
- an engine whose stop hangs or fails right now (or did less than 2 TICK + STOP_MAX ago, time
  to retry) may keep running and is not counted as idle.

Transient states that are legitimate and therefore not violations:
- a cluster being launched belongs to the LAUNCHING row that launched it (its `cluster`
  column is written when the launch returns); during a takeover the cluster belongs to the
  victim's row until the swap returns;
- while no live gateway holds the lease and has finished its startup (kill -9, stall, lease
  loss, a standby reconciling), live rows need no live owner;
- a READY row whose engine died is not checked here: the ledger check bounds how long it bills.
An engine running under a FAILED or STOPPED row is a violation, hanging stop or not.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.sim import driver
from tests.sim.plan import (
    CHECK_EVERY,
    COLD_START_TIMEOUT,
    DRAIN,
    HEARTBEAT,
    MAX_WAITING,
    ORPHAN_SWEEP,
    TICK,
    max_replicas,
    unlisted_bounds,
)
from tests.sim.store_view import TERMINAL, Interval, Row

if TYPE_CHECKING:
    from tests.sim.cloud import Cluster
    from tests.sim.sim import Gateway, Sim

PINNED = 2


@dataclass(frozen=True)
class Violation:
    seed: int
    step: int
    at: float
    invariant: str
    detail: str

    def line(self) -> str:
        return f"seed {self.seed} step {self.step} t={self.at:.1f}s {self.invariant}: {self.detail}"


class Checker:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.stop_max = sim.cloud.durations.stop_max
        self.wait_bound = COLD_START_TIMEOUT + DRAIN + self.stop_max + 2 * TICK
        self.fault_grace = 2 * TICK + self.stop_max
        self.violations: list[Violation] = []
        self._seen: set[tuple[object, ...]] = set()
        self._calls_checked = 0
        self._events_after = 0
        self.holderless: list[list[float]] = []  # [start, end or inf]: no live lease holder
        self._orphaned: dict[str, float] = {}  # cluster -> when it was first seen an orphan

    def flag(self, invariant: str, key: object, detail: str) -> None:
        if (invariant, key) in self._seen:
            return
        self._seen.add((invariant, key))
        v = Violation(self.sim.seed, self.sim.step_index, self.sim.now(), invariant, self.sim.scrub(detail))
        self.violations.append(v)
        self.sim.log(f"VIOLATION {v.invariant}: {v.detail}")

    # -- who is in charge -------------------------------------------------------------------

    def holder(self) -> Gateway | None:
        """The live gateway holding a valid lease that has finished its startup, if any."""
        lease = self.sim.view.lease()
        if lease is None or lease[1] < self.sim.now():
            return None
        gw = self.sim.by_holder.get(lease[0])
        if gw is None or gw.state != "serving" or gw.name in self.sim.loop.frozen:
            return None
        if gw.started_at is None:  # a follower that took the lease and is reconciling
            return None
        return gw

    # -- checks -----------------------------------------------------------------------------

    def _track_holder(self, holder: Gateway | None) -> None:
        now = self.sim.now()
        if holder is not None and holder.db.fail_until > now:
            holder = None  # its store refuses every write: it can record nothing it sees
        if holder is None and (not self.holderless or self.holderless[-1][1] != math.inf):
            self.holderless.append([now, math.inf])
        elif holder is not None and self.holderless and self.holderless[-1][1] == math.inf:
            self.holderless[-1][1] = now

    def unwatched(self, at: float) -> float:
        """How long nobody watched around `at`: the length of the stretch without a live lease
        holder that `at` falls in (sampled every check, hence the CHECK_EVERY either side), 0
        if a holder watched then. Only that stretch: a later one says nothing about `at`."""
        now = self.sim.now()
        for start, end in self.holderless:
            if start - CHECK_EVERY <= at <= end + CHECK_EVERY:
                return min(end, now) - start + CHECK_EVERY
        return 0.0

    def after_step(self) -> None:
        rows = self.sim.view.rows()
        holder = self.holder()
        self._track_holder(holder)
        self.world_owned(rows, holder)
        self.owner_alive(rows, holder)
        self.stale_routes(rows, holder)
        self.replicas(holder)
        self.ledger(self.sim.view.intervals(), watched=holder is not None)
        self.fencing()
        self.schedules()
        self.periodic()

    def periodic(self) -> None:
        self._track_holder(self.holder())
        self.orphans(self.sim.view.rows(), self.holder())
        self.schedules()
        self.in_flight()
        self.request_waits()
        self.idle_billing(self.holder())

    def world_owned(self, rows: list[Row], holder: Gateway | None) -> None:
        live = [r for r in rows if r.state not in TERMINAL]
        for c in self.sim.cloud.clusters.values():
            owners = [
                r for r in live if r.cluster == c.name or (r.cluster is None and r.id == c.label_deployment)
            ]
            if len(owners) == 1 or (not owners and self._orphan_in_time(c, rows, holder)):
                continue
            known = [r for r in rows if r.cluster == c.name or r.id in (c.label_deployment, c.deployment_id)]
            states = ", ".join(f"{self.sim.alias(r.id)} {r.model} {r.state}" for r in known) or "no row"
            self.flag(
                "world-owned",
                (c.name, c.deployment_id),
                f"{c.name} ({c.model}, engine {c.engine}) runs under {len(owners)} live deployments: {states}",
            )

    def orphans(self, rows: list[Row], holder: Gateway | None) -> None:
        """Which clusters are orphans now (`_orphan_in_time`), between the world-owned checks."""
        live = {r.cluster for r in rows if r.state not in TERMINAL} | {
            r.id for r in rows if r.state not in TERMINAL and r.cluster is None
        }
        for c in self.sim.cloud.clusters.values():
            if c.name not in live and c.label_deployment not in live:
                self._orphan_in_time(c, rows, holder)

    def _orphan_in_time(self, c: Cluster, rows: list[Row], holder: Gateway | None) -> bool:
        """An orphan (its launch's gateway died before recording it, and the next one's reconcile
        could not list it: its row ended with no cluster, or it has none) runs until the holder's
        orphan sweep stops it: within a sweep interval of the holder's startup, of the orphan's
        appearance or of the holder's last failed list, plus a tick and the stop."""
        if any(r.cluster == c.name for r in rows):
            self._orphaned.pop(c.name, None)
            return False
        label = next((r for r in rows if r.id == c.label_deployment), None)
        if label is not None and (label.state not in TERMINAL or label.cluster is not None):
            self._orphaned.pop(c.name, None)
            return False
        now = self.sim.now()
        since = self._orphaned.setdefault(c.name, now)
        if (
            holder is None
            or holder.started_at is None
            or self.sim.cloud.stop_fault_active(c, self.fault_grace)
        ):
            return True
        since = max(
            since,
            holder.started_at,
            holder.awake_since,
            self.sim.cloud.list_failed.get(holder.name, -math.inf),
        )
        return now <= since + ORPHAN_SWEEP + 2 * TICK + self.stop_max + 1

    def owner_alive(self, rows: list[Row], holder: Gateway | None) -> None:
        if holder is None:
            return
        owned = driver.owners(holder.app)
        for r in rows:
            if r.state not in TERMINAL and r.id not in owned:
                self.flag(
                    "owner-alive",
                    r.id,
                    f"{self.sim.alias(r.id)} ({r.model}) is {r.state} but {holder.name}, the lease holder, "
                    f"does not own it",
                )

    def stale_routes(self, rows: list[Row], holder: Gateway | None) -> None:
        if holder is None:
            return
        state = {r.id: r.state for r in rows}
        for model, dep in driver.routes(holder.app).items():
            if dep is not None and state.get(dep) != "ready":
                self.flag(
                    "stale-route",
                    dep,
                    f"{holder.name} routes {model} to {self.sim.alias(dep)}, which is {state.get(dep)}",
                )

    def replicas(self, holder: Gateway | None) -> None:
        """A model serves at most replicas.max replicas, and at most one of them starts at a time."""
        if holder is None:
            return
        for model, (serving, starting) in driver.replicas(holder.app).items():
            if serving > max_replicas(model) or starting > 1:
                self.flag(
                    "replicas",
                    (model, serving, starting),
                    f"{holder.name} has {serving} replicas of {model} serving (max {max_replicas(model)}) "
                    f"and {starting} starting (at most 1)",
                )

    def in_flight(self) -> None:
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for rec in self.sim.open_requests():
            if rec.phase == "in-flight":
                counts[(rec.gateway, rec.model)] += 1
        for gw in self.sim.gateways:
            if gw.state == "killed":
                continue
            for model in self.sim.models_seen:
                got = driver.in_flight(gw.app, model)
                if got != counts[(gw.name, model)]:
                    self.flag(
                        "in-flight",
                        (gw.name, model, got),
                        f"{gw.name} counts {got} requests in flight for {model}; "
                        f"{counts[(gw.name, model)]} are open",
                    )

    def request_waits(self) -> None:
        now = self.sim.now()
        for rec in self.sim.open_requests():
            if rec.phase != "waiting" or rec.stalled or rec.wait_started is None:
                continue
            if now - rec.wait_started > self.wait_bound:
                self.flag(
                    "request-wait",
                    rec.id,
                    f"request {rec.id} for {rec.model} on {rec.gateway} has waited "
                    f"{now - rec.wait_started:.0f}s > {self.wait_bound:.0f}s",
                )

    def _effective(self, holder: Gateway, model: str) -> tuple[int, float, float]:
        return driver.effective(holder.app, model) or unlisted_bounds(
            model, self.sim.keep_hot_patched.get(model)
        )

    def idle_billing(self, holder: Gateway | None) -> None:
        """Idle is judged like the controller does, per model on the lease holder: a request of
        the model in flight keeps all its engines busy, and its last begin or end counts."""
        if holder is None or holder.started_at is None:
            return
        now, world = self.sim.now(), self.sim.cloud
        busy = {
            r.model for r in self.sim.open_requests() if r.gateway == holder.name and r.phase == "in-flight"
        }
        for c in world.clusters.values():
            if c.engine in ("provisioning", "loading") or c.model in busy:
                continue
            if c.swapping and now - (c.swap_started_at or 0.0) <= COLD_START_TIMEOUT + TICK:
                continue  # the claimer's cold time (billed so), until its cold-start timeout
            if c.name in self._orphaned:  # no gateway knows it: world-owned bounds it
                continue
            if world.stop_fault_active(c, self.fault_grace):
                continue
            priority, keep_hot, spare = self._effective(holder, c.model)
            if priority >= PINNED:
                continue
            # An engine that exited while loading was never idle: its start was under way until
            # then (counting from the cluster's creation flagged a failed start that was being
            # stopped: seed 160).
            started = c.ready_at if c.ready_at is not None else (c.load_failed_at or c.created_at)
            since = max(
                started,
                # A swap onto it that failed or timed out (seed 103: it hung until the claimer's
                # cold-start timeout) was the claimer's cold time: idle only from its end.
                c.swap_ended_at if c.swap_ended_at is not None else -math.inf,
                self.sim.last_activity.get((holder.name, c.model), -math.inf),
                self.sim.changed_at.get(c.model, -math.inf),
                holder.started_at,
                holder.awake_since,
            )
            deadline = since + keep_hot + TICK + self.stop_max + TICK
            if spare > 0:  # kept as a spare after the idle stop, until the tick after it expires
                deadline += spare + TICK
            if now > deadline:
                self.flag(
                    "idle-billing",
                    (c.name, c.engine_seq),
                    f"{c.name} ({c.model}, engine {c.engine}) idle since t={since:.0f}s, keep-hot "
                    f"{keep_hot:g}s, still billed at t={now:.0f}s",
                )

    def after_hours(self, firing: float, deployments: set[str]) -> None:
        """Called at firing + TICK + DRAIN + STOP_MAX + TICK with the deployments live at the firing."""
        for c in self.sim.cloud.clusters.values():
            if c.deployment_id not in deployments or self.sim.cloud.stop_fault_active(c, self.fault_grace):
                continue
            # An orphan (a reconcile closed its row while the list failed: seed 1642) is stopped
            # by the orphan sweep, within the world-owned bound, not by after-hours.
            if c.name in self._orphaned:
                continue
            self.flag(
                "after-hours",
                (firing, c.name),
                f"{c.name} ({c.model} {self.sim.alias(c.deployment_id)}, engine {c.engine}) still runs "
                f"{self.sim.now() - firing:.0f}s after the after-hours firing at t={firing:.0f}s",
            )

    def ledger(self, intervals: list[Interval], *, watched: bool = True) -> None:
        """Intervals never overlap per cluster; while a lease holder watches, they add up to
        what the cloud ran (with no holder, open intervals wait for the next reconcile to
        close them at what it can know, so their sums are judged once one holds again)."""
        now, world = self.sim.now(), self.sim.cloud
        by_cluster: dict[str, list[Interval]] = defaultdict(list)
        phantom: dict[str, float] = defaultdict(float)
        for iv in intervals:
            cluster = iv.cluster or world.launched_by.get(iv.deployment_id)
            if cluster is None:
                if iv.end is not None:
                    phantom[iv.deployment_id] += iv.end - iv.start
                continue
            by_cluster[cluster].append(iv)
        for dep, seconds in phantom.items():
            if seconds > 2 * TICK + 1:
                self.flag(
                    "ledger-sum",
                    ("phantom", dep),
                    f"{self.sim.alias(dep)} was billed {seconds:.0f}s without ever holding a cluster",
                )
        for name in sorted(set(by_cluster) | set(world.billing)):
            spans = sorted(by_cluster.get(name, []), key=lambda iv: iv.start)
            for a, b in itertools.pairwise(spans):
                if b.start < (a.end if a.end is not None else now) - 1e-3:
                    self.flag(
                        "ledger-overlap",
                        name,
                        f"{name}: {a.phase} of {self.sim.alias(a.deployment_id)} and {b.phase} of "
                        f"{self.sim.alias(b.deployment_id)} overlap at t={b.start:.0f}s",
                    )
            if not watched:
                continue
            billed = sum((iv.end if iv.end is not None else now) - iv.start for iv in spans)
            ran = sum(min(end, now) - start for start, end in world.billing.get(name, []))
            tolerance = 2 * TICK + 1 + (HEARTBEAT + TICK if name in world.died else 0)
            if self._blind_orphan(name):
                continue
            if name in world.removed_at:  # it went while nobody watched: its end is a guess
                tolerance += self.unwatched(world.removed_at[name])
            if abs(billed - ran) > tolerance:
                self.flag(
                    "ledger-sum",
                    name,
                    f"{name}: the ledger bills {billed:.0f}s, the cloud ran it {ran:.0f}s",
                )

    def _blind_orphan(self, name: str) -> bool:
        """An orphan still running (world-owned bounds how long), or one the failsafe deleted
        while the gateways could not list the cloud: no gateway knows it runs, so its ledger
        cannot say how long (the sweep that stops one bills it up to the stop)."""
        world = self.sim.cloud
        if name not in self._orphaned:
            return False
        if name in world.clusters:
            return True
        if name not in world.died:
            return False
        gone = world.removed_at[name]
        return any(gone - ORPHAN_SWEEP - 2 * TICK <= f <= gone for f in world.list_failures)

    def fencing(self) -> None:
        calls = self.sim.cloud.calls
        for call in calls[self._calls_checked :]:
            if call.holder != call.view:
                self.flag(
                    "fencing",
                    (call.view, call.op, call.cluster),
                    f"{call.view} called {call.op} on {call.cluster} ({self.sim.alias(call.deployment_id)}) "
                    f"at t={call.at:.0f}s while the lease holder was {call.holder}",
                )
        self._calls_checked = len(calls)

    def schedules(self) -> None:
        """Schedule actions happen within a tick of a firing (events carry the gateway's clock)."""
        for ev in self.sim.view.events(self._events_after):
            self._events_after = ev.id
            if ev.kind == "after-hours-stop":
                firings, at, late = self.sim.after_hours_at, ev.at, TICK + 2
            elif ev.kind == "prewarm":
                firings, at, late = self.sim.prewarm_at, ev.at, TICK + 2
            else:
                continue
            if not any(f < at <= self._woke_after(f) + late for f in firings):
                last = max((f for f in firings if f < at), default=None)
                when = f"t={last:.0f}s" if last is not None else "never"
                self.flag(
                    "schedule-replay",
                    (ev.kind, round(at)),
                    f"{ev.kind} of {ev.model} at t={at:.0f}s; the schedule last fired {when}",
                )

    def _woke_after(self, at: float) -> float:
        """When the gateways stalled across `at` were awake again (a stalled holder fires a
        schedule late, at its first tick after the stall: late, not replayed); `at` if none."""
        ends = [end for gw in self.sim.gateways for start, end in gw.stalls if start <= at < end]
        return max(ends, default=at)

    # -- outcomes ---------------------------------------------------------------------------

    def request_outcome(self, rec: driver.Request, error: BaseException | None) -> None:
        if error is None or rec.client_cancelled:
            return
        from gateway.api.errors import GatewayError

        if isinstance(error, GatewayError):
            if error.code == "queue_full":
                self.queue_full(rec)
            return
        self.flag(
            "client-error",
            (rec.model, type(error).__name__, rec.phase),
            f"request {rec.id} for {rec.model} ({'stream' if rec.stream else 'plain'}, {rec.phase}) "
            f"ended with {type(error).__name__}: {str(error)[:120]} instead of an OpenAI error",
        )

    def queue_full(self, rec: driver.Request) -> None:
        now = self.sim.now()
        window = COLD_START_TIMEOUT + DRAIN + self.stop_max
        waiting = sum(
            1
            for r in self.sim.open_requests()
            if r.gateway == rec.gateway and r.model == rec.model and r.phase == "waiting" and r is not rec
        )
        admitted_by_others = sum(
            1
            for at, gw, m in self.sim.other_waiters
            if gw == rec.gateway and m == rec.model and now - at <= window
        )
        if waiting + admitted_by_others < MAX_WAITING:
            self.flag(
                "queue-full",
                (rec.gateway, rec.model),
                f"request {rec.id} for {rec.model} refused 503 queue_full with {waiting} clients waiting "
                f"(+{admitted_by_others} admin loads / pre-warms) < max_waiting_requests {MAX_WAITING}",
            )

    def admin_reply(self, gw: Gateway, what: str, status: int | None, envelope: bool, error: str) -> None:
        if status is not None and envelope:
            return
        self.flag(
            "admin-error",
            (what.split()[0], status, error[:40]),
            f"{gw.name} admin {what} answered {status if status is not None else error} "
            f"without an OpenAI envelope",
        )

    def lifespan(self, gw: Gateway, phase: str, error: BaseException) -> None:
        self.flag(
            "lifespan",
            (gw.name, phase, type(error).__name__),
            f"{gw.name} {phase} raised {type(error).__name__}: {str(error)[:160]}",
        )

    def final(self) -> None:
        """After every gateway shut down cleanly (no faults any more): nothing is left behind."""
        self.after_step()
        rows = self.sim.view.rows()
        stuck: set[str | None] = set()  # a stop that hangs until cancelled: it may stay STOPPING
        for c in self.sim.cloud.clusters.values():
            if self.sim.cloud.stop_fault_active(c, self.fault_grace):
                stuck |= {c.name, c.deployment_id, c.label_deployment}
                continue
            self.flag(
                "final-state", ("cluster", c.name), f"{c.name} ({c.model}) still runs after the last shutdown"
            )
        for r in rows:
            if r.state not in TERMINAL and r.id not in stuck and r.cluster not in stuck:
                self.flag("final-state", ("row", r.id), f"{self.sim.alias(r.id)} ({r.model}) left {r.state}")
        for iv in self.sim.view.intervals():
            if iv.end is None and iv.deployment_id not in stuck:
                self.flag(
                    "final-state",
                    ("interval", iv.deployment_id),
                    f"cost interval of {self.sim.alias(iv.deployment_id)} left open",
                )
        lease = self.sim.view.lease()
        if lease is not None:
            gw = self.sim.by_holder.get(lease[0])
            self.flag(
                "lease-released",
                lease[0],
                f"the lease is still held by {gw.name if gw else lease[0]} after it shut down",
            )
