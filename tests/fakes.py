"""FakeProvider: the Provider protocol with scripted delays and failures, for fast tests.

Engines are not started; `wait_ready` returns a configured endpoint (usually a stub upstream).
Every call is recorded so tests can assert what the controller did."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from tasks.provider import (
    CapacityError,
    ClusterInfo,
    ClusterRef,
    Endpoint,
    LaunchSpec,
    LoadingState,
    ProviderError,
)


@dataclass
class FakeProvider:
    endpoint: str = "http://127.0.0.1:9"
    launch_delay: float = 0.0
    ready_delay: float = 0.0
    stop_delay: float = 0.0
    launch_error: Exception | None = None
    ready_error: Exception | None = None
    list_error: Exception | None = None  # list() raises it (the provider's API is down)
    name: str = "fake"
    adopt_on_restart: bool = False
    keeps_spares: bool = False
    heartbeat_interval_seconds: float | None = None
    heartbeat_error: Exception | None = None  # heartbeat() raises it (EngineGone: preempted)
    healthy: bool = True  # what probe() answers for running engines
    capacity_gpus: int | None = None  # launches past this many GPUs in use raise CapacityError
    accelerators: tuple[str, ...] = ()  # GPU types of the "clusters" it launches
    # Fake time: with a clock that has advance(seconds), a launch and a wait take this long.
    clock: Any = None
    launch_seconds: float = 0.0
    ready_seconds: float = 0.0
    launches: list[LaunchSpec] = field(default_factory=list)
    stops: list[ClusterRef] = field(default_factory=list)
    swaps: list[tuple[ClusterRef, LaunchSpec]] = field(default_factory=list)
    running: dict[str, ClusterRef] = field(default_factory=dict)
    heartbeats: list[ClusterRef] = field(default_factory=list)

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        self.launches.append(spec)
        await asyncio.sleep(self.launch_delay)
        if self.clock is not None:
            self.clock.advance(self.launch_seconds)
        if self.launch_error is not None:
            raise self.launch_error
        in_use = sum(ref.gpus for ref in self.running.values())
        if self.capacity_gpus is not None and in_use + spec.gpus > self.capacity_gpus:
            raise CapacityError(f"{in_use} of {self.capacity_gpus} GPUs in use", tried=("fake-region",))
        return self._start(spec, f"fake-{spec.deployment_id}", spec.gpus)

    def _start(self, spec: LaunchSpec, name: str, gpus: int) -> ClusterRef:
        accel = {k: gpus for k in self.accelerators}
        ref = ClusterRef(
            provider=self.name,
            name=name,
            deployment_id=spec.deployment_id,
            gpus=gpus,
            data={"model": spec.model, "accelerators": accel},
        )
        self.running[spec.deployment_id] = ref
        return ref

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        await asyncio.sleep(self.ready_delay)
        if self.clock is not None:
            self.clock.advance(self.ready_seconds)
        if self.ready_error is not None:
            raise self.ready_error
        if ref.deployment_id not in self.running:
            raise ProviderError(f"{ref.name} is not running")
        return Endpoint(base_url=self.endpoint)

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        self.swaps.append((ref, spec))
        self.running.pop(ref.deployment_id, None)
        return self._start(spec, ref.name, ref.gpus)  # same cluster, same GPUs

    def fits(self, ref: ClusterRef, spec: LaunchSpec) -> bool:
        accel = ref.data.get("accelerators") or {}
        allowed = not spec.accelerators or not accel or bool(set(spec.accelerators) & set(accel))
        return ref.gpus >= spec.gpus and allowed

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        return (
            Endpoint(base_url=self.endpoint) if ref.deployment_id in self.running and self.healthy else None
        )

    async def probe_loading(self, ref: ClusterRef) -> LoadingState:
        if ref.deployment_id not in self.running:
            return "dead"
        return "ready" if self.healthy else "loading"

    async def check_failsafe(self, instance_id: str | None = None) -> list[str]:
        return []

    async def close(self) -> None:
        return None

    async def heartbeat(self, ref: ClusterRef) -> None:
        self.heartbeats.append(ref)
        if self.heartbeat_error is not None:
            raise self.heartbeat_error

    async def stop(self, ref: ClusterRef) -> None:
        self.stops.append(ref)
        await asyncio.sleep(self.stop_delay)
        self.running.pop(ref.deployment_id, None)

    async def list(self, instance_id: str | None = None) -> list[ClusterInfo]:
        if self.list_error is not None:
            raise self.list_error
        return [
            ClusterInfo(ref=ref, status="running", model=ref.data.get("model"))
            for ref in self.running.values()
        ]
