"""SimCloud: one simulated cloud shared by every simulated gateway.

The world (clusters, GPUs in use, what each cluster costs) moves on its own timers, whoever
asked: a launch whose caller was killed still comes up, like a SkyPilot request the API server
keeps running. Each gateway talks to it through its own view (`cloud.view(name)`, views.py: the
Provider protocol), so every mutating call (launch, swap, stop, heartbeat) is recorded with the
gateway that made it, the virtual time and the gateway that held the controller lease then.

Like SkyPilot, clusters delete themselves (failsafe) three heartbeat intervals after the last
heartbeat, and a cluster's labels are the ones it was launched with.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.provider import ClusterRef, EngineExited, LaunchSpec, ProviderError
from tasks.sky_task import model_slug
from tests.sim.faults import Durations, FaultProfile

if TYPE_CHECKING:
    from tests.sim.views import SimProvider

PROVIDER_NAME = "sim"
FOREVER = math.inf


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
    load_failed_at: float | None = None  # its engine exited while loading (never ready)
    armed_at: float = 0.0  # last failsafe heartbeat (or the launch)
    stop_fault_until: float = -math.inf  # a stop of it hangs or failed until then
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    load_timer: asyncio.TimerHandle | None = None
    swapping: bool = False
    launch: asyncio.Future[None] | None = None  # its launch, while provisioning
    swap_started_at: float | None = None  # the last swap onto it: a claimer's cold start
    swap_ended_at: float | None = None

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


class SimCloud:
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
        self.removed_at: dict[str, float] = {}  # cluster -> when it went
        self.removals: list[Removal] = []
        self.calls: list[CallRecord] = []
        self.injected: Counter[str] = Counter()
        self.fault_log: list[str] = []
        self.trace: list[str] = trace if trace is not None else []
        self.outage_until: dict[str, float] = {}  # "list", "heartbeat": an outage window
        self.list_failed: dict[str, float] = {}  # gateway -> when its last `list` failed
        self.list_failures: list[float] = []  # when any gateway's `list` failed
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
        from tests.sim.views import SimProvider

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
        if cluster.launch is not None and not cluster.launch.done():  # a launch hung while it went
            cluster.launch.set_exception(ProviderError(f"{cluster.name} vanished while launching ({reason})"))
        self.removed_at[cluster.name] = self.now
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
        cluster.load_failed_at = None
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
            cluster.load_failed_at = self.now
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
