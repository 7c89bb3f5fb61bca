"""SimCloud: one simulated cloud shared by every simulated gateway, behind the Provider protocol.

The world (clusters, GPUs in use, what each cluster costs) moves on its own timers, whoever
asked: a launch whose caller was killed still comes up, like a SkyPilot request the API server
keeps running. Each gateway talks to it through its own view (`cloud.view(name)`), so every
mutating call (launch, swap, stop, heartbeat) is recorded with the gateway that made it, the
virtual time and whether that gateway held the controller lease at that moment.

Faults are drawn from the seed's random generator, per call, with the probabilities of the
seed's `FaultProfile`: capacity errors, launch / load / swap failures, launches, loads, swaps,
stops and heartbeats that hang (for hours, or until cancelled), stops that fail (the engine keeps
running), probes that wrongly say "unhealthy", `list` failing (the API server is down). The
driver adds engines that crash or are preempted. Like SkyPilot, clusters delete themselves
(failsafe) three heartbeat intervals after the last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.provider import (
    CapacityError,
    ClusterInfo,
    ClusterRef,
    Endpoint,
    EngineExited,
    LaunchSpec,
    ProviderError,
)
from tasks.sky_task import model_slug

PROVIDER_NAME = "sim"
FOREVER = math.inf


@dataclass(frozen=True)
class Durations:
    """Virtual seconds of the world's operations when nothing goes wrong (uniform ranges)."""

    capacity_check: tuple[float, float] = (0.5, 4.0)  # trying regions before a CapacityError
    provision: tuple[float, float] = (2.0, 20.0)
    load: tuple[float, float] = (5.0, 30.0)
    swap_cancel: tuple[float, float] = (0.5, 3.0)
    swap_exec: tuple[float, float] = (1.0, 5.0)
    stop: tuple[float, float] = (1.0, 10.0)
    heartbeat: tuple[float, float] = (0.1, 1.0)
    probe: tuple[float, float] = (0.05, 0.3)
    list: tuple[float, float] = (0.1, 0.5)
    hang: tuple[float, float] = (3600.0, 3 * 3600.0)  # a "long" hang

    @property
    def stop_max(self) -> float:
        return self.stop[1]


@dataclass(frozen=True)
class FaultProfile:
    """Per-call fault probabilities of one seed."""

    capacity: float = 0.0  # a spurious CapacityError although GPUs are free
    launch_fail: float = 0.0
    launch_hang: float = 0.0
    load_fail: float = 0.0  # the engine exits while loading (EngineExited)
    load_hang: float = 0.0  # the engine never becomes healthy
    swap_capacity: float = 0.0
    swap_fail_before: float = 0.0  # nothing changed on the cluster
    swap_fail_after: float = 0.0  # the old engine is gone, the new one did not start
    swap_hang: float = 0.0
    stop_fail: float = 0.0
    stop_hang: float = 0.0
    heartbeat_fail: float = 0.0
    heartbeat_hang: float = 0.0
    probe_false: float = 0.0  # says unhealthy although the engine is fine
    list_fail: float = 0.0
    hang_forever: float = 0.5  # share of hangs that last until cancelled (else for hours)

    @classmethod
    def draw(cls, rng: random.Random) -> FaultProfile:
        """A profile for one seed: calm, bumpy or wild, each fault switched on or off."""
        level = rng.choice((0.0, 0.02, 0.05, 0.12))

        def p(weight: float = 1.0) -> float:
            return level * weight if rng.random() < 0.6 else 0.0

        return cls(
            capacity=p(),
            launch_fail=p(),
            launch_hang=p(0.5),
            load_fail=p(),
            load_hang=p(0.5),
            swap_capacity=p(),
            swap_fail_before=p(),
            swap_fail_after=p(),
            swap_hang=p(0.5),
            stop_fail=p(),
            stop_hang=p(0.5),
            heartbeat_fail=p(2),
            heartbeat_hang=p(0.5),
            probe_false=p(),
            list_fail=p(3),
            hang_forever=rng.choice((0.0, 0.5, 1.0)),
        )


@dataclass
class Cluster:
    name: str
    gpus: int
    label_deployment: str  # labels are set at launch and never change (SkyPilot)
    label_slug: str
    deployment_id: str  # the deployment whose engine runs on it now (changes on swap)
    model: str
    created_at: float
    engine: str = "provisioning"  # provisioning, loading, ready, crashed, none
    engine_seq: int = 0
    ready_at: float | None = None
    armed_at: float = 0.0  # last failsafe heartbeat (or the launch)
    stop_fault_until: float = -math.inf  # a stop of it hangs or failed until then
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    load_timer: asyncio.TimerHandle | None = None
    swapping: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://{self.name}.sim/e{self.engine_seq}"


@dataclass(frozen=True)
class CallRecord:
    at: float
    view: str
    op: str
    cluster: str
    deployment_id: str
    holder: str | None  # the gateway holding a valid lease at that moment


@dataclass(frozen=True)
class Removal:
    at: float
    cluster: str
    deployment_id: str
    model: str
    reason: str  # stopped, launch-failed, abandoned, preempted, failsafe


class World:
    """The shared state of the simulated cloud."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        *,
        faults: FaultProfile,
        capacity_gpus: int,
        heartbeat_interval: float,
        durations: Durations | None = None,
        holder_of: Callable[[], str | None] = lambda: None,
        alias: Callable[[str], str] = lambda s: s,
        trace: list[str] | None = None,
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.faults = faults
        self.capacity_gpus = capacity_gpus
        self.heartbeat_interval = heartbeat_interval
        self.durations = durations or Durations()
        self.holder_of = holder_of
        self.alias = alias
        self.clusters: dict[str, Cluster] = {}
        self.billing: dict[str, list[list[float]]] = {}  # cluster -> [start, end or inf]
        self.launched_by: dict[str, str] = {}  # deployment id -> cluster its launch created
        self.died: dict[str, float] = {}  # cluster -> when it vanished without a stop
        self.removals: list[Removal] = []
        self.calls: list[CallRecord] = []
        self.injected: Counter[str] = Counter()
        self.fault_log: list[str] = []
        self.trace: list[str] = trace if trace is not None else []
        self.outage_until: dict[str, float] = {}  # "list", "heartbeat": an outage window
        self._ctx = contextvars.Context()  # the world's own timers belong to no gateway
        self._seq = 0

    # -- helpers ----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.time()

    def draw(self, span: tuple[float, float]) -> float:
        return self.rng.uniform(*span)

    def roll(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def later(self, delay: float, fn: Callable[..., object], *args: Any) -> asyncio.TimerHandle | None:
        if delay == FOREVER:
            return None
        return self.loop.call_at(self.now + delay, fn, *args, context=self._ctx)

    def hang_seconds(self) -> float:
        return FOREVER if self.roll(self.faults.hang_forever) else self.draw(self.durations.hang)

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now:10.3f} {text}")

    def fault(self, kind: str, view: str, target: str) -> None:
        self.injected[kind] += 1
        line = f"{self.now:10.3f} fault {kind} {view} {target}"
        self.fault_log.append(line)
        self.trace.append(line)

    def record(self, view: str, op: str, cluster: str, deployment_id: str) -> None:
        holder = self.holder_of()
        self.calls.append(CallRecord(self.now, view, op, cluster, deployment_id, holder))
        self.log(f"call {view} {op} {cluster} {self.alias(deployment_id)} holder={holder}")

    def gpus_in_use(self) -> int:
        return sum(c.gpus for c in self.clusters.values())

    def view(self, name: str) -> SimProvider:
        return SimProvider(self, name)

    # -- clusters ---------------------------------------------------------------------------

    def create(self, spec: LaunchSpec) -> Cluster:
        self._seq += 1
        name = f"c{self._seq}"
        cluster = Cluster(
            name=name,
            gpus=spec.gpus,
            label_deployment=spec.deployment_id,
            label_slug=model_slug(spec.model),
            deployment_id=spec.deployment_id,
            model=spec.model,
            created_at=self.now,
            armed_at=self.now,
        )
        self.clusters[name] = cluster
        self.billing.setdefault(name, []).append([self.now, math.inf])
        self.launched_by[spec.deployment_id] = name
        self._arm(cluster)
        self.log(f"create {name} for {spec.model} {self.alias(spec.deployment_id)} ({spec.gpus} GPU)")
        return cluster

    def remove(self, cluster: Cluster, reason: str) -> None:
        if self.clusters.get(cluster.name) is not cluster:
            return
        del self.clusters[cluster.name]
        self.billing[cluster.name][-1][1] = self.now
        if reason in ("preempted", "failsafe"):
            self.died[cluster.name] = self.now
        if cluster.load_timer is not None:
            cluster.load_timer.cancel()
        self._wake(cluster, EngineExited(f"cluster {cluster.name} is gone ({reason})"))
        self.removals.append(Removal(self.now, cluster.name, cluster.deployment_id, cluster.model, reason))
        self.log(f"remove {cluster.name} ({reason})")

    def ref(self, cluster: Cluster) -> ClusterRef:
        return ClusterRef(
            provider=PROVIDER_NAME,
            name=cluster.name,
            deployment_id=cluster.deployment_id,
            gpus=cluster.gpus,
            data={
                "model": cluster.model,
                "accelerators": {"L4": cluster.gpus},
                "hourly_price": 0.8 * cluster.gpus,
                "model_slug": cluster.label_slug,
            },
        )

    def serves(self, cluster_name: str, deployment_id: str | None, endpoint: str) -> bool:
        """Whether a request sent to `endpoint` would be answered by that deployment's engine."""
        c = self.clusters.get(cluster_name)
        return (
            c is not None
            and c.engine == "ready"
            and c.deployment_id == deployment_id
            and c.endpoint == endpoint
        )

    def cluster_of_endpoint(self, endpoint: str) -> str:
        return endpoint.removeprefix("http://").split(".sim", 1)[0]

    # -- engines ----------------------------------------------------------------------------

    def start_engine(self, cluster: Cluster, view: str) -> None:
        """An engine process starts on the cluster and loads its weights."""
        cluster.engine = "loading"
        cluster.engine_seq += 1
        cluster.ready_at = None
        if self.roll(self.faults.load_fail):
            self.fault("load-fail", view, cluster.name)
            cluster.load_timer = self.later(self.draw(self.durations.load), self._crash_loading, cluster)
        elif self.roll(self.faults.load_hang):
            self.fault("load-hang", view, cluster.name)
        else:
            cluster.load_timer = self.later(self.draw(self.durations.load), self._ready, cluster)

    def _ready(self, cluster: Cluster) -> None:
        cluster.load_timer = None
        if cluster.name in self.clusters and cluster.engine == "loading":
            cluster.engine = "ready"
            cluster.ready_at = self.now
            self.log(f"ready {cluster.name} {cluster.model} {self.alias(cluster.deployment_id)}")
            self._wake(cluster, None)

    def _crash_loading(self, cluster: Cluster) -> None:
        cluster.load_timer = None
        if cluster.engine == "loading":
            cluster.engine = "crashed"
            self.log(f"engine exited while loading on {cluster.name}")
            self._wake(cluster, EngineExited(f"engine on {cluster.name} exited while loading (code 1)"))

    def crash(self, cluster: Cluster) -> None:
        """The engine dies while serving; the cluster (and its bill) stays."""
        cluster.engine = "crashed"
        self.log(f"engine crashed on {cluster.name}")

    def _wake(self, cluster: Cluster, error: BaseException | None) -> None:
        waiters, cluster.waiters = cluster.waiters, []
        for fut in waiters:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    # -- failsafe ---------------------------------------------------------------------------

    def _arm(self, cluster: Cluster) -> None:
        cluster.armed_at = self.now
        self.later(3 * self.heartbeat_interval, self._failsafe, cluster, cluster.armed_at)

    def _failsafe(self, cluster: Cluster, armed_at: float) -> None:
        if cluster.armed_at == armed_at and self.clusters.get(cluster.name) is cluster:
            self.remove(cluster, "failsafe")

    def stop_fault_active(self, cluster: Cluster, grace: float) -> bool:
        return self.now <= cluster.stop_fault_until + grace


class SimProvider:
    """One gateway's view of the world: the Provider protocol."""

    adopt_on_restart = True

    def __init__(self, world: World, view: str) -> None:
        self.world = world
        self.view = view
        self.name = PROVIDER_NAME

    @property
    def heartbeat_interval_seconds(self) -> float:
        return self.world.heartbeat_interval

    async def _pause(self, span: tuple[float, float]) -> None:
        await asyncio.sleep(self.world.draw(span))

    async def _await(self, fut: asyncio.Future[Any]) -> Any:
        return await fut

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        w, f = self.world, self.world.faults
        w.record(self.view, "launch", "-", spec.deployment_id)
        full = w.gpus_in_use() + spec.gpus > w.capacity_gpus
        if full or w.roll(f.capacity):
            if not full:
                w.fault("capacity", self.view, spec.model)
            await self._pause(w.durations.capacity_check)
            raise CapacityError(
                f"no {spec.gpus}x L4 in sim-east, sim-west ({w.gpus_in_use()}/{w.capacity_gpus} GPUs in use)",
                tried=("sim-east", "sim-west"),
            )
        cluster = w.create(spec)
        fails = w.roll(f.launch_fail)
        delay = w.draw(w.durations.provision)
        if not fails and w.roll(f.launch_hang):
            w.fault("launch-hang", self.view, cluster.name)
            delay = w.hang_seconds()
        elif fails:
            w.fault("launch-fail", self.view, cluster.name)
        done: asyncio.Future[None] = w.loop.create_future()
        w.later(delay, self._provisioned, cluster, fails, done)
        try:
            await done
        except asyncio.CancelledError:
            w.log(f"launch of {cluster.name} cancelled: the provider downs what it created")
            w.remove(cluster, "abandoned")
            raise
        return w.ref(cluster)

    def _provisioned(self, cluster: Cluster, fails: bool, done: asyncio.Future[None]) -> None:
        w = self.world
        if w.clusters.get(cluster.name) is not cluster:
            if not done.done():
                done.set_exception(ProviderError(f"{cluster.name} vanished while launching"))
            return
        if fails:
            w.remove(cluster, "launch-failed")  # the provider cleans up before it raises
            if not done.done():
                done.set_exception(ProviderError(f"launch of {cluster.name} failed: setup exited 1"))
            return
        w.start_engine(cluster, self.view)
        if not done.done():
            done.set_result(None)

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        w = self.world
        cluster = w.clusters.get(ref.name)
        if cluster is None or cluster.deployment_id != ref.deployment_id:
            raise ProviderError(f"{ref.name} is not running {ref.deployment_id}")
        if cluster.engine in ("crashed", "none"):
            raise EngineExited(f"engine on {ref.name} is not running")
        if cluster.engine != "ready":
            fut: asyncio.Future[None] = w.loop.create_future()
            cluster.waiters.append(fut)
            await fut
        return Endpoint(base_url=cluster.endpoint)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        w = self.world
        await self._pause(w.durations.probe)
        cluster = w.clusters.get(ref.name)
        if cluster is None or cluster.deployment_id != ref.deployment_id or cluster.engine != "ready":
            return None
        if w.roll(w.faults.probe_false):
            w.fault("probe-false", self.view, ref.name)
            return None
        return Endpoint(base_url=cluster.endpoint)

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        w, f = self.world, self.world.faults
        w.record(self.view, "swap", ref.name, spec.deployment_id)
        cluster = w.clusters.get(ref.name)
        if cluster is None:
            raise ProviderError(f"swap of {ref.name}: ClusterDoesNotExist")
        if cluster.gpus < spec.gpus or w.roll(f.swap_capacity):
            if cluster.gpus >= spec.gpus:
                w.fault("swap-capacity", self.view, ref.name)
            raise CapacityError(f"{ref.name} has {cluster.gpus} GPUs; {spec.model} needs {spec.gpus}")
        outcome = "ok"
        for kind, p in (
            ("swap-fail-before", f.swap_fail_before),
            ("swap-fail-after", f.swap_fail_after),
            ("swap-hang", f.swap_hang),
        ):
            if w.roll(p):
                outcome = kind
                w.fault(kind, self.view, ref.name)
                break
        done: asyncio.Future[None] = w.loop.create_future()
        steps = _SwapSteps(w, self.view, cluster, spec, outcome, done)
        steps.begin()
        try:
            await done
        except asyncio.CancelledError:
            steps.abort()
            raise
        return w.ref(cluster)

    async def heartbeat(self, ref: ClusterRef) -> None:
        w, f = self.world, self.world.faults
        w.record(self.view, "heartbeat", ref.name, ref.deployment_id)
        await self._pause(w.durations.heartbeat)
        if w.now < w.outage_until.get("heartbeat", -1.0) or w.roll(f.heartbeat_fail):
            w.fault("heartbeat-fail", self.view, ref.name)
            raise ProviderError(f"heartbeat of {ref.name}: API server unavailable")
        if w.roll(f.heartbeat_hang):
            w.fault("heartbeat-hang", self.view, ref.name)
            await self._hang()
        cluster = w.clusters.get(ref.name)
        if cluster is None:
            raise ProviderError(f"heartbeat of {ref.name}: ClusterDoesNotExist")
        w._arm(cluster)

    async def stop(self, ref: ClusterRef) -> None:
        w, f = self.world, self.world.faults
        w.record(self.view, "stop", ref.name, ref.deployment_id)
        cluster = w.clusters.get(ref.name)
        if cluster is None:
            await self._pause(w.durations.probe)
            return
        delay = w.draw(w.durations.stop)
        if w.roll(f.stop_fail):
            w.fault("stop-fail", self.view, ref.name)
            cluster.stop_fault_until = max(cluster.stop_fault_until, w.now + delay)
            await asyncio.sleep(delay)
            raise ProviderError(f"down of {ref.name}: API server error 500")
        if w.roll(f.stop_hang):
            w.fault("stop-hang", self.view, ref.name)
            delay = w.hang_seconds()
            cluster.stop_fault_until = max(cluster.stop_fault_until, w.now + delay)
        done: asyncio.Future[None] = w.loop.create_future()
        timer = w.later(delay, self._stopped, cluster, done)
        try:
            await done
        except asyncio.CancelledError:
            if timer is not None:
                timer.cancel()  # a stop cut short: the engine keeps running
            w.log(f"stop of {ref.name} cancelled: it keeps running")
            cluster.stop_fault_until = max(cluster.stop_fault_until, w.now)
            raise

    def _stopped(self, cluster: Cluster, done: asyncio.Future[None]) -> None:
        self.world.remove(cluster, "stopped")
        if not done.done():
            done.set_result(None)

    async def list(self) -> list[ClusterInfo]:
        w = self.world
        await self._pause(w.durations.list)
        if w.now < w.outage_until.get("list", -1.0) or w.roll(w.faults.list_fail):
            w.fault("list-fail", self.view, "-")
            raise ProviderError("status: API server unavailable")
        return [
            ClusterInfo(
                ref=ClusterRef(
                    provider=PROVIDER_NAME,
                    name=c.name,
                    deployment_id=c.label_deployment,
                    data={"model_slug": c.label_slug},
                ),
                status="INIT" if c.engine == "provisioning" else "UP",
            )
            for c in w.clusters.values()
        ]

    async def _hang(self) -> None:
        seconds = self.world.hang_seconds()
        if seconds == FOREVER:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(seconds)


class _SwapSteps:
    """A swap on the world's timers: stop the old engine, then start the new one."""

    def __init__(
        self,
        world: World,
        view: str,
        cluster: Cluster,
        spec: LaunchSpec,
        outcome: str,
        done: asyncio.Future[None],
    ) -> None:
        self.w, self.view, self.cluster, self.spec, self.outcome, self.done = (
            world,
            view,
            cluster,
            spec,
            outcome,
            done,
        )
        self.timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        w = self.w
        self.cluster.swapping = True
        if self.outcome == "swap-fail-before":
            self.timer = w.later(w.draw(w.durations.swap_cancel), self._fail, "cancel of the old job failed")
        elif self.outcome == "swap-hang":
            self.timer = w.later(w.hang_seconds(), self._old_stopped)
        else:
            self.timer = w.later(w.draw(w.durations.swap_cancel), self._old_stopped)

    def _old_stopped(self) -> None:
        w, c = self.w, self.cluster
        if w.clusters.get(c.name) is not c:
            return self._fail("cluster vanished during the swap")
        c.engine = "none"
        if c.load_timer is not None:
            c.load_timer.cancel()
        w.log(f"swap: old engine on {c.name} stopped")
        if self.outcome == "swap-fail-after":
            self.timer = w.later(w.draw(w.durations.swap_exec), self._fail, "exec of the new job failed")
        else:
            self.timer = w.later(w.draw(w.durations.swap_exec), self._new_started)

    def _new_started(self) -> None:
        w, c = self.w, self.cluster
        if w.clusters.get(c.name) is not c:
            return self._fail("cluster vanished during the swap")
        c.deployment_id, c.model = self.spec.deployment_id, self.spec.model
        w.start_engine(c, self.view)
        c.swapping = False
        w.log(f"swap: {c.name} now runs {c.model} {w.alias(c.deployment_id)}")
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, why: str) -> None:
        self.cluster.swapping = False
        if not self.done.done():
            self.done.set_exception(ProviderError(f"swap of {self.cluster.name} to {self.spec.model}: {why}"))

    def abort(self) -> None:
        """The caller went away: the step in progress is not finished (nothing is undone)."""
        if self.timer is not None:
            self.timer.cancel()
        self.cluster.swapping = False
        self.w.log(f"swap of {self.cluster.name} cancelled (engine: {self.cluster.engine})")
