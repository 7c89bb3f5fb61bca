"""One gateway's view of SimCloud: the Provider protocol (tasks/provider.py).

Faults are drawn per call from the seed's random generator with the probabilities of the seed's
`FaultProfile`: capacity errors, launch / load / swap failures, launches, loads, swaps, stops and
heartbeats that hang (for hours, or until cancelled), stops that fail (the engine keeps
running), probes that wrongly say "unhealthy", `list` failing (the API server is down).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tasks.provider import (
    CapacityError,
    ClusterInfo,
    ClusterRef,
    Endpoint,
    EngineExited,
    EngineGone,
    LaunchSpec,
    LoadingState,
    ProviderError,
)
from tests.sim.cloud import FOREVER, PROVIDER_NAME, Cluster, SimCloud


class SimProvider:
    """One gateway's view of the world: the Provider protocol."""

    adopt_on_restart = True
    keeps_spares = True

    def __init__(self, world: SimCloud, view: str) -> None:
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
        cluster.launch = done
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

    def fits(self, ref: ClusterRef, spec: LaunchSpec) -> bool:
        cluster = self.world.clusters.get(ref.name)
        return cluster is not None and cluster.gpus >= spec.gpus

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
        if cluster is None:  # like SkyPilot's provider: a cluster that is gone is EngineGone
            raise EngineGone(f"heartbeat of {ref.name}: ClusterDoesNotExist")
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

    async def probe_loading(self, ref: ClusterRef) -> LoadingState:
        """Like SkyPilot's: the engine's /health, else whether its cluster still runs one."""
        w = self.world
        await self._pause(w.durations.probe)
        cluster = w.clusters.get(ref.name)
        if cluster is None or cluster.deployment_id != ref.deployment_id:
            return "dead"
        return "ready" if cluster.engine == "ready" else "loading" if cluster.engine == "loading" else "dead"

    async def check_failsafe(self, instance_id: str | None = None) -> list[str]:
        return []  # every SimCloud cluster is armed (the world's failsafe downs it)

    async def close(self) -> None:
        return None

    async def list(self, instance_id: str | None = None) -> list[ClusterInfo]:
        w = self.world
        await self._pause(w.durations.list)
        if w.now < w.outage_until.get("list", -1.0) or w.roll(w.faults.list_fail):
            w.fault("list-fail", self.view, "-")
            w.list_failed[self.view] = w.now
            w.list_failures.append(w.now)
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
        world: SimCloud,
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
        self.cluster.swap_started_at = w.now
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
        c.swapping, c.swap_ended_at = False, w.now
        w.log(f"swap: {c.name} now runs {c.model} {w.alias(c.deployment_id)}")
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, why: str) -> None:
        self.cluster.swapping, self.cluster.swap_ended_at = False, self.w.now
        if not self.done.done():
            self.done.set_exception(ProviderError(f"swap of {self.cluster.name} to {self.spec.model}: {why}"))

    def abort(self) -> None:
        """The caller went away: the step in progress is not finished (nothing is undone)."""
        if self.timer is not None:
            self.timer.cancel()
        self.cluster.swapping, self.cluster.swap_ended_at = False, self.w.now
        self.w.log(f"swap of {self.cluster.name} cancelled (engine: {self.cluster.engine})")
