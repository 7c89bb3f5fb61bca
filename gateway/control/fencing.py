"""Fencing: only the controller-lease holder causes provider side effects.

`FencedProvider` wraps the real provider; every call that changes something (launch, swap,
stop, heartbeat) first checks that this process holds the lease right now, and raises `Fenced`
otherwise. Read-only calls (probe, list, wait_ready) pass. A process whose lease lapsed (it
stalled, or the database was unreachable past the deadline) therefore cannot down the engines
the new holder has just adopted, whatever path it is on.
"""

from __future__ import annotations

from collections.abc import Callable

from tasks.provider import (
    ClusterInfo,
    ClusterRef,
    Endpoint,
    LaunchSpec,
    LoadingState,
    Provider,
    ProviderError,
)


class Fenced(ProviderError):
    """This process does not hold the controller lease: it must not act."""

    fenced = True


class FencedProvider:
    def __init__(self, inner: Provider, held: Callable[[], bool]) -> None:
        self.inner = inner
        self._held = held
        self.name = inner.name
        self.adopt_on_restart = inner.adopt_on_restart
        self.keeps_spares = inner.keeps_spares

    @property
    def heartbeat_interval_seconds(self) -> float | None:
        return self.inner.heartbeat_interval_seconds

    def _check(self, what: str) -> None:
        if not self._held():
            raise Fenced(f"not the controller lease holder: {what} refused")

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        self._check(f"launch of {spec.model}")
        return await self.inner.launch(spec)

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        self._check(f"swap of {ref.name}")
        return await self.inner.swap(ref, spec)

    def fits(self, ref: ClusterRef, spec: LaunchSpec) -> bool:
        return self.inner.fits(ref, spec)

    async def stop(self, ref: ClusterRef) -> None:
        self._check(f"stop of {ref.name}")
        await self.inner.stop(ref)

    async def heartbeat(self, ref: ClusterRef) -> None:
        self._check(f"heartbeat of {ref.name}")
        await self.inner.heartbeat(ref)

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        return await self.inner.wait_ready(ref)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        return await self.inner.probe(ref)

    async def probe_loading(self, ref: ClusterRef) -> LoadingState:
        return await self.inner.probe_loading(ref)

    async def check_failsafe(self, instance_id: str | None = None) -> list[str]:
        self._check("failsafe check")  # it re-arms autodown where it is off
        return await self.inner.check_failsafe(instance_id)

    async def close(self) -> None:
        await self.inner.close()

    async def list(self, instance_id: str | None = None) -> list[ClusterInfo]:
        return await self.inner.list(instance_id)
