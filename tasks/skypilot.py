"""SkyPilotProvider: one SkyPilot cluster running vLLM per deployment.

Every cluster is launched with autodown after `failsafe_minutes` whatever its jobs do
(`wait_for=none`): the gateway re-sends the autostop while it holds the cluster, so a gateway
that dies leaves clusters that delete themselves. SkyPilot errors are mapped to ours here:
`ResourcesUnavailableError` → `CapacityError` (with the regions tried), anything else →
`ProviderError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from tasks.health import is_healthy, wait_healthy
from tasks.provider import (
    CapacityError,
    ClusterInfo,
    ClusterRef,
    Endpoint,
    EngineExited,
    LaunchSpec,
    ProviderError,
)
from tasks.sky_client import SkyClient, SkyTimeout
from tasks.sky_task import (
    ENGINE_PORT,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    MANAGED_BY,
    SkyTaskConfig,
    cluster_name,
    render_task,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkyPilotConfig:
    task: SkyTaskConfig = field(default_factory=SkyTaskConfig)
    # Autodown of a cluster the gateway stopped caring about (it died). The heartbeat re-arms it
    # every third of this, so a live gateway never loses a cluster to it.
    failsafe_minutes: int = 30
    # How often the vLLM job's status is read while waiting for /health: a failed job ends the
    # wait at once instead of at the cold-start timeout.
    job_check_seconds: float = 15.0


def regions_tried(exc: BaseException) -> tuple[str, ...]:
    """The regions (or zones) a failed launch tried, from `failover_history`."""
    tried: list[str] = []
    for entry in getattr(exc, "failover_history", None) or []:
        # SkyPilot 0.14 says "Failed to acquire resources in all zones in us-west-2 for ...";
        # the entries carry no region attribute.
        text = str(entry)
        found = re.findall(r" in all zones in ([a-z0-9-]+)", text) or re.findall(
            r"\b[a-z]{2,}(?:-[a-z]+)+-\d\b", text
        )
        for region in found or [text[:120]]:
            if region not in tried:
                tried.append(region)
    return tuple(tried)


def map_error(exc: BaseException, what: str) -> ProviderError:
    from sky import exceptions as sky_exc

    if isinstance(exc, ProviderError):  # already ours (e.g. a SkyTimeout from the client)
        return exc
    if isinstance(exc, sky_exc.ResourcesUnavailableError):
        tried = regions_tried(exc)
        where = f" (tried: {', '.join(tried)})" if tried else ""
        return CapacityError(f"{what}: no capacity{where}: {_first_line(exc)}", tried=tried)
    return ProviderError(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _is_missing(exc: BaseException) -> bool:
    from sky import exceptions as sky_exc

    return isinstance(exc, sky_exc.ClusterDoesNotExist)


def _launched_accelerators(handle: Any) -> dict[str, int]:
    resources = getattr(handle, "launched_resources", None)
    accelerators = getattr(resources, "accelerators", None) or {}
    return {str(k): int(v) for k, v in dict(accelerators).items()}


class SkyPilotProvider:
    name = "skypilot"
    adopt_on_restart = True  # clusters outlive the gateway: a healthy one is taken back

    def __init__(self, client: SkyClient, config: SkyPilotConfig | None = None) -> None:
        self.client = client
        self.config = config or SkyPilotConfig()

    @property
    def heartbeat_interval_seconds(self) -> float:
        return self.config.failsafe_minutes * 60 / 3

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        name = cluster_name(spec)
        try:
            task = render_task(spec, self.config.task)
        except Exception as exc:  # the task does not validate: nothing was started
            raise ProviderError(f"invalid SkyPilot task for {spec.model}: {exc}") from exc
        request_id = await self.client.launch(
            task, cluster_name=name, idle_minutes_to_autostop=self.config.failsafe_minutes
        )
        log.info("cluster %s for %s: launch submitted (request %s)", name, spec.model, request_id)
        try:
            job_id, handle = await self.client.wait_launch(request_id)
        except asyncio.CancelledError:
            await self._abandon(name, request_id)
            raise
        except Exception as exc:
            mapped = map_error(exc, f"launch of {name} for {spec.model}")
            # Never leave a half-made cluster billing; a request that timed out may still run.
            await self._abandon(name, request_id if isinstance(exc, SkyTimeout) else None)
            raise mapped from exc
        return ClusterRef(
            provider=self.name,
            name=name,
            deployment_id=spec.deployment_id,
            gpus=spec.gpus,
            data={
                "model": spec.model,
                "job_id": job_id,
                "accelerators": _launched_accelerators(handle),
                "hourly_price": await self._price(handle),
            },
        )

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        endpoint = await self._endpoint(ref)
        health = asyncio.create_task(wait_healthy(endpoint.base_url))
        watch = asyncio.create_task(self._watch_job(ref))
        try:
            done, _ = await asyncio.wait({health, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                watch.result()  # raises EngineExited
            health.result()
            return endpoint
        finally:
            for task in (health, watch):
                task.cancel()
            await asyncio.gather(health, watch, return_exceptions=True)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        """The engine's endpoint if it answers /health now; None otherwise."""
        try:
            endpoint = await self._endpoint(ref)
        except ProviderError:
            return None
        return endpoint if await is_healthy(endpoint.base_url) else None

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        """Run `spec`'s model on `ref`'s cluster: cancel the vLLM job, exec the new one with the
        cluster's own accelerators (else SkyPilot sees 0 GPUs per node)."""
        accelerators = dict(ref.data.get("accelerators") or {})
        if sum(accelerators.values()) < spec.gpus:
            raise CapacityError(f"{ref.name} has {accelerators or 'no GPUs'}; {spec.model} needs {spec.gpus}")
        old_job = ref.data.get("job_id")
        try:
            if old_job is not None:
                await self.client.cancel(ref.name, job_ids=[int(old_job)])
            task = render_task(spec, self.config.task, accelerators=accelerators)
            job_id, _ = await self.client.exec(task, cluster_name=ref.name)
        except Exception as exc:
            raise map_error(exc, f"swap of {ref.name} to {spec.model}") from exc
        log.info(
            "cluster %s: job %s (%s) replaced by job %s (%s)",
            ref.name,
            old_job,
            ref.data.get("model"),
            job_id,
            spec.model,
        )
        return ClusterRef(
            provider=self.name,
            name=ref.name,
            deployment_id=spec.deployment_id,
            gpus=spec.gpus,
            data={"model": spec.model, "job_id": job_id, "accelerators": accelerators},
        )

    async def heartbeat(self, ref: ClusterRef) -> None:
        """Re-arm the failsafe autodown: the cluster goes down `failsafe_minutes` from now unless
        the next heartbeat comes first."""
        try:
            await self.client.autostop(ref.name, idle_minutes=self.config.failsafe_minutes)
        except Exception as exc:
            raise map_error(exc, f"heartbeat of {ref.name}") from exc

    async def stop(self, ref: ClusterRef) -> None:
        try:
            await self.client.down(ref.name)
        except Exception as exc:
            if _is_missing(exc):
                return
            raise map_error(exc, f"down of {ref.name}") from exc
        log.info("cluster %s: down", ref.name)

    async def list(self) -> list[ClusterInfo]:
        """Clusters carrying our label, as `sky status` shows them."""
        try:
            records = await self.client.status()
        except Exception as exc:
            raise map_error(exc, "status") from exc
        infos = []
        for record in records:
            labels = dict(getattr(record, "labels", None) or {})
            if labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
                continue
            status = getattr(record, "status", None)
            ref = ClusterRef(
                provider=self.name,
                name=str(record.name),
                deployment_id=labels.get(LABEL_DEPLOYMENT, ""),
                data={"labels": labels, "model_slug": labels.get(LABEL_MODEL)},
            )
            infos.append(ClusterInfo(ref=ref, status=str(getattr(status, "value", status))))
        return infos

    # -- internals --------------------------------------------------------------------------

    async def _endpoint(self, ref: ClusterRef) -> Endpoint:
        try:
            endpoints = await self.client.endpoints(ref.name, ENGINE_PORT)
        except Exception as exc:
            raise map_error(exc, f"endpoint of {ref.name}") from exc
        address = endpoints.get(ENGINE_PORT)
        if not address:
            raise ProviderError(f"{ref.name} exposes no endpoint for port {ENGINE_PORT}")
        return Endpoint(base_url=address if address.startswith("http") else f"http://{address}")

    async def _watch_job(self, ref: ClusterRef) -> None:
        raw_job = ref.data.get("job_id")
        if raw_job is None:
            await asyncio.Event().wait()  # nothing to watch: only /health (and the timeout) end the wait
            return
        job_id = int(raw_job)
        while True:
            await asyncio.sleep(self.config.job_check_seconds)
            try:
                statuses = await self.client.job_status(ref.name, [job_id])
            except Exception as exc:
                if _is_missing(exc):
                    raise EngineExited(f"cluster {ref.name} is gone") from exc
                log.warning("cluster %s: job status unknown: %s", ref.name, _first_line(exc))
                continue
            status = statuses.get(job_id)
            if status is not None and status.is_terminal():
                raise EngineExited(f"vLLM job {job_id} on {ref.name} ended: {status.value}")

    async def _price(self, handle: Any) -> float | None:
        try:
            return await self.client.hourly_price(getattr(handle, "launched_resources", None))
        except ProviderError as exc:  # the gateway's price table applies
            log.warning("no catalog price: %s", exc)
            return None

    async def _abandon(self, name: str, request_id: str | None) -> None:
        """Cancel a launch request (if still running) and down whatever it created."""
        if request_id is not None:
            with contextlib.suppress(Exception):
                await self.client.api_cancel(request_id)
        try:
            await self.client.down(name)
        except Exception as exc:
            if not _is_missing(exc):
                log.error("cluster %s: down after a failed launch failed: %s", name, _first_line(exc))
