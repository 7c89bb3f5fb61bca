"""FakeProvider: the Provider protocol with scripted delays and failures, for fast tests.

Engines are not started; `wait_ready` returns a configured endpoint (usually a stub upstream).
Every call is recorded so tests can assert what the controller did."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tasks.provider import ClusterInfo, ClusterRef, Endpoint, LaunchSpec, ProviderError


@dataclass
class FakeProvider:
    endpoint: str = "http://127.0.0.1:9"
    launch_delay: float = 0.0
    ready_delay: float = 0.0
    stop_delay: float = 0.0
    launch_error: Exception | None = None
    ready_error: Exception | None = None
    name: str = "fake"
    adopt_on_restart: bool = False
    heartbeat_interval_seconds: float | None = None
    healthy: bool = True  # what probe() answers for running engines
    launches: list[LaunchSpec] = field(default_factory=list)
    stops: list[ClusterRef] = field(default_factory=list)
    swaps: list[tuple[ClusterRef, LaunchSpec]] = field(default_factory=list)
    running: dict[str, ClusterRef] = field(default_factory=dict)
    heartbeats: list[ClusterRef] = field(default_factory=list)

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        self.launches.append(spec)
        await asyncio.sleep(self.launch_delay)
        if self.launch_error is not None:
            raise self.launch_error
        ref = ClusterRef(
            provider=self.name,
            name=f"fake-{spec.deployment_id}",
            deployment_id=spec.deployment_id,
            gpus=spec.gpus,
            data={"model": spec.model},
        )
        self.running[spec.deployment_id] = ref
        return ref

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        await asyncio.sleep(self.ready_delay)
        if self.ready_error is not None:
            raise self.ready_error
        if ref.deployment_id not in self.running:
            raise ProviderError(f"{ref.name} is not running")
        return Endpoint(base_url=self.endpoint)

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        self.swaps.append((ref, spec))
        await self.stop(ref)
        return await self.launch(spec)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        return (
            Endpoint(base_url=self.endpoint) if ref.deployment_id in self.running and self.healthy else None
        )

    async def heartbeat(self, ref: ClusterRef) -> None:
        self.heartbeats.append(ref)

    async def stop(self, ref: ClusterRef) -> None:
        self.stops.append(ref)
        await asyncio.sleep(self.stop_delay)
        self.running.pop(ref.deployment_id, None)

    async def list(self) -> list[ClusterInfo]:
        return [
            ClusterInfo(ref=ref, status="running", model=ref.data.get("model"))
            for ref in self.running.values()
        ]
