"""SkyPilotProvider: one SkyPilot cluster running vLLM per deployment.

Every cluster is launched with autodown after `failsafe_minutes` whatever its jobs do
(`wait_for=none`): the gateway re-sends the autostop while it holds the cluster, so a gateway
that dies leaves clusters that delete themselves (`check_failsafe` verifies that at startup).
Every cluster carries this installation's label; `list()` sees no other cluster, so reconcile
and shutdown never touch another gateway's. SkyPilot errors are mapped to ours here:
`ResourcesUnavailableError` with regions tried → `CapacityError`, without (nothing feasible: a
configuration error) → `ProviderError`; a cluster that no longer exists → `EngineGone`.
"""

from __future__ import annotations

import asyncio
import builtins
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
    EngineGone,
    LaunchSpec,
    LoadingState,
    ProviderError,
)
from tasks.sky_client import SkyClient, SkyTimeout
from tasks.sky_task import (
    FRONT_PORT,
    LABEL_DEPLOYMENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    MANAGED_BY,
    SkyTaskConfig,
    cluster_name,
    render_task,
)

log = logging.getLogger(__name__)

# API servers older than this drop `wait_for` (SDK warning only): the failsafe would never fire
# while vLLM runs.
MIN_API_VERSION = 13


@dataclass(frozen=True)
class SkyPilotConfig:
    task: SkyTaskConfig = field(default_factory=SkyTaskConfig)
    # Autodown of a cluster the gateway stopped caring about (it died). The heartbeat re-arms it
    # every third of this, so a live gateway never loses a cluster to it.
    failsafe_minutes: int = 30
    # How often the vLLM job's status is read while waiting for /health: a failed job ends the
    # wait at once instead of at the cold-start timeout.
    job_check_seconds: float = 15.0
    # How often the endpoint is asked for again while SkyPilot has none yet (a k8s LoadBalancer).
    endpoint_retry_seconds: float = 5.0


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
    if isinstance(exc, sky_exc.ClusterDoesNotExist):
        return EngineGone(f"{what}: the cluster no longer exists")
    if isinstance(exc, sky_exc.ResourcesUnavailableError):
        tried = regions_tried(exc)
        if not tried:  # the optimizer found nothing feasible: unknown GPU, disallowed cloud, ...
            return ProviderError(f"{what}: no feasible resources: {_first_line(exc)}")
        return CapacityError(
            f"{what}: no capacity (tried: {', '.join(tried)}): {_first_line(exc)}", tried=tried
        )
    return ProviderError(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _launched(handle: Any) -> tuple[Any, dict[str, int]]:
    """A handle's launched `sky.Resources` and its accelerators."""
    resources = getattr(handle, "launched_resources", None)
    accelerators = getattr(resources, "accelerators", None) or {}
    return resources, {str(k): int(v) for k, v in dict(accelerators).items()}


def _require(spec: LaunchSpec) -> None:
    if not spec.engine_key:
        raise ProviderError(f"deployment {spec.deployment_id}: no engine key; engines are never started open")
    if not spec.instance_id:
        raise ProviderError(f"deployment {spec.deployment_id}: no instance id to label the cluster with")


class SkyPilotProvider:
    name = "skypilot"
    adopt_on_restart = True  # clusters outlive the gateway: a healthy one is taken back
    keeps_spares = True  # a swap onto a live cluster skips provisioning and setup

    def __init__(self, client: SkyClient, config: SkyPilotConfig | None = None) -> None:
        self.client = client
        self.config = config or SkyPilotConfig()

    @property
    def heartbeat_interval_seconds(self) -> float:
        return self.config.failsafe_minutes * 60 / 3

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        _require(spec)
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
        resources, accelerators = _launched(handle)
        return ClusterRef(
            provider=self.name,
            name=name,
            deployment_id=spec.deployment_id,
            gpus=spec.gpus,
            data={
                "model": spec.model,
                "job_id": job_id,
                "accelerators": accelerators,
                "hourly_price": await self._price(resources),
            },
            engine_key=spec.engine_key,
        )

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        """Until the endpoint exists (retried: a k8s LoadBalancer takes a while), its /health is
        200 and its /v1/models names the model; a job that ends ends the wait."""
        if not ref.engine_key:
            raise ProviderError(f"deployment {ref.deployment_id}: no engine key to check the engine with")
        ready = asyncio.create_task(self._until_ready(ref))
        watch = asyncio.create_task(self._watch_job(ref))
        try:
            done, _ = await asyncio.wait({ready, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                watch.result()  # raises EngineExited / EngineGone
            return ready.result()
        finally:
            for task in (ready, watch):
                task.cancel()
            await asyncio.gather(ready, watch, return_exceptions=True)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        """The engine's endpoint if it answers /health now; None otherwise."""
        try:
            endpoint = await self._endpoint(ref)
        except ProviderError:
            return None
        return endpoint if await is_healthy(endpoint.base_url) else None

    async def probe_loading(self, ref: ClusterRef) -> LoadingState:
        """`dead` only when certain (cluster gone or not up, job over); raises ProviderError when
        SkyPilot cannot say (then resume waiting: the cold-start timeout bounds it)."""
        if await self.probe(ref) is not None:
            return "ready"
        raw_job = ref.data.get("job_id")
        try:
            if raw_job is None:  # adopted without a job id: the cluster's state is all there is
                records = await self.client.status([ref.name])
                return "loading" if records and _status(records[0]) == "UP" else "dead"
            status = (await self.client.job_status(ref.name, [int(raw_job)])).get(int(raw_job))
        except Exception as exc:
            if _is_gone_or_down(exc):
                return "dead"
            raise map_error(exc, f"job status of {ref.name}") from exc
        return "dead" if status is None or status.is_terminal() else "loading"

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        """Run `spec`'s model on `ref`'s cluster: cancel the vLLM job and exec the new one with
        `spec.gpus` of the cluster's GPUs (its tensor parallelism; the rest stay idle). The new
        job's run script waits until the old engine has let go of its ports and GPUs; the ref
        keeps the cluster's price (the whole cluster is billed, whatever runs on it)."""
        _require(spec)
        accelerators = dict(ref.data.get("accelerators") or {})
        fitting = _fitting(accelerators, spec)
        if not fitting:
            raise CapacityError(f"{ref.name} has {accelerators or 'no GPUs'}; {spec.model} needs {spec.gpus}")
        old_job = ref.data.get("job_id")
        try:
            task = render_task(spec, self.config.task, accelerators={fitting[0]: spec.gpus})
        except Exception as exc:
            raise ProviderError(f"invalid SkyPilot task for {spec.model}: {exc}") from exc
        try:
            if old_job is not None:
                await self.client.cancel(ref.name, job_ids=[int(old_job)])
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
            data={
                "model": spec.model,
                "job_id": job_id,
                "accelerators": accelerators,
                "hourly_price": ref.data.get("hourly_price"),
            },
            engine_key=spec.engine_key,
        )

    def fits(self, ref: ClusterRef, spec: LaunchSpec) -> bool:
        return bool(_fitting(dict(ref.data.get("accelerators") or {}), spec))

    async def heartbeat(self, ref: ClusterRef) -> None:
        """Re-arm the failsafe autodown: the cluster goes down `failsafe_minutes` from now unless
        the next heartbeat comes first. A cluster that no longer exists: `EngineGone`."""
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

    async def list(self, instance_id: str | None = None) -> list[ClusterInfo]:
        """This installation's clusters, as `sky status` shows them, their refs built from the
        launched resources (accelerators and price, so an adopted cluster can be swapped)."""
        records = await self._ours(instance_id)
        infos = []
        for record in records:
            labels = dict(record.labels or {})
            resources, accelerators = _launched(getattr(record, "handle", None))
            ref = ClusterRef(
                provider=self.name,
                name=str(record.name),
                deployment_id=labels.get(LABEL_DEPLOYMENT, ""),
                gpus=max(accelerators.values(), default=1),
                data={
                    "labels": labels,
                    "model_slug": labels.get(LABEL_MODEL),
                    "accelerators": accelerators,
                    "hourly_price": await self._price(resources),
                },
            )
            infos.append(ClusterInfo(ref=ref, status=_status(record)))
        return infos

    async def check_failsafe(self, instance_id: str | None = None) -> builtins.list[str]:
        """The API server keeps `wait_for` (version), and every cluster of ours has its
        autodown armed; re-armed where it is not. Raises ProviderError if the failsafe cannot
        work (an API server too old or unhealthy)."""
        try:
            info = await self.client.api_info()
        except Exception as exc:
            raise map_error(exc, "API server check") from exc
        status = str(getattr(info.status, "value", info.status))
        version = int(info.api_version) if str(info.api_version).isdigit() else 0
        if status != "healthy" or version < MIN_API_VERSION:
            raise ProviderError(
                f"the SkyPilot API server (status {status}, API version {info.api_version or '?'}, "
                f"{info.version or '?'}) cannot arm the failsafe: it needs API version >= {MIN_API_VERSION}"
            )
        found = [f"SkyPilot API server {info.version} (API version {version}): failsafe autodown supported"]
        for record in await self._ours(instance_id):
            found.append(await self._rearm(record))
        return found

    async def close(self) -> None:
        self.client.close()

    # -- internals --------------------------------------------------------------------------

    async def _ours(self, instance_id: str | None) -> builtins.list[Any]:
        if not instance_id:
            raise ProviderError("listing clusters needs this installation's id (never another's clusters)")
        try:
            records = await self.client.status()
        except Exception as exc:
            raise map_error(exc, "status") from exc
        return [
            r
            for r in records
            if (r.labels or {}).get(LABEL_MANAGED_BY) == MANAGED_BY
            and (r.labels or {}).get(LABEL_INSTANCE) == instance_id
        ]

    async def _rearm(self, record: Any) -> str:
        minutes, to_down, status = int(record.autostop), bool(record.to_down), _status(record)
        if minutes >= 0 and to_down:
            return f"{record.name} ({status}): autodown after {minutes} min idle"
        if status != "UP":  # SkyPilot arms it when the launch ends: if that launch died, it never will
            return f"{record.name} ({status}): no autodown until its launch ends; reconcile must decide"
        try:
            await self.client.autostop(str(record.name), idle_minutes=self.config.failsafe_minutes)
        except Exception as exc:
            return f"{record.name} ({status}): autodown was off and re-arming failed: {map_error(exc, 'autostop')}"
        return f"{record.name} ({status}): autodown was off, re-armed ({self.config.failsafe_minutes} min)"

    async def _price(self, resources: Any) -> float | None:
        try:
            return await self.client.hourly_price(resources)
        except ProviderError as exc:  # the gateway's price table applies
            log.warning("no catalog price: %s", exc)
            return None

    async def _endpoint(self, ref: ClusterRef) -> Endpoint:
        if self.config.task.network == "private":
            return await self._internal_endpoint(ref)
        try:
            endpoints = await self.client.endpoints(ref.name, FRONT_PORT)
        except Exception as exc:
            raise map_error(exc, f"endpoint of {ref.name}") from exc
        address = endpoints.get(FRONT_PORT)
        if not address:
            raise ProviderError(f"{ref.name} exposes no endpoint for port {FRONT_PORT} (yet)")
        return Endpoint(base_url=address if address.startswith("http") else f"http://{address}")

    async def _internal_endpoint(self, ref: ClusterRef) -> Endpoint:
        """No port is opened: the head node's address as SkyPilot knows it (its internal IP with
        `aws.use_internal_ips`), for a gateway inside the network."""
        try:
            records = await self.client.status([ref.name])
        except Exception as exc:
            raise map_error(exc, f"address of {ref.name}") from exc
        if not records:
            raise EngineGone(f"address of {ref.name}: the cluster no longer exists")
        head_ip = getattr(records[0].handle, "head_ip", None)
        if not head_ip:
            raise ProviderError(f"{ref.name} has no head address (yet)")
        return Endpoint(base_url=f"http://{head_ip}:{FRONT_PORT}")

    async def _until_ready(self, ref: ClusterRef) -> Endpoint:
        while True:
            try:
                endpoint = await self._endpoint(ref)
                break
            except EngineGone:
                raise
            except ProviderError as exc:
                log.info("cluster %s: %s; asking again", ref.name, exc)
                await asyncio.sleep(self.config.endpoint_retry_seconds)
        await wait_healthy(endpoint.base_url, model=str(ref.data["model"]), key=ref.engine_key)
        return endpoint

    async def _watch_job(self, ref: ClusterRef) -> None:
        raw_job = ref.data.get("job_id")
        if raw_job is None:
            await asyncio.Event().wait()  # nothing to watch: only readiness (and the timeout) end the wait
            return
        job_id = int(raw_job)
        while True:
            await asyncio.sleep(self.config.job_check_seconds)
            try:
                statuses = await self.client.job_status(ref.name, [job_id])
            except Exception as exc:
                if _is_missing(exc):
                    raise EngineGone(f"cluster {ref.name} of deployment {ref.deployment_id} is gone") from exc
                log.warning("cluster %s: job status unknown: %s", ref.name, _first_line(exc))
                continue
            status = statuses.get(job_id)
            if status is not None and status.is_terminal():
                raise EngineExited(
                    f"the engine for {ref.data.get('model')} (deployment {ref.deployment_id}) ended: "
                    f"vLLM job {job_id} on {ref.name} is {status.value}"
                )

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


def _fitting(accelerators: dict[str, int], spec: LaunchSpec) -> list[str]:
    """The cluster's GPU types that can run `spec`: enough of them, and allowed by the model."""
    return [
        name
        for name, count in accelerators.items()
        if count >= spec.gpus and (not spec.accelerators or name in spec.accelerators)
    ]


def _status(record: Any) -> str:
    return str(getattr(record.status, "value", record.status))


def _is_missing(exc: BaseException) -> bool:
    from sky import exceptions as sky_exc

    return isinstance(exc, (sky_exc.ClusterDoesNotExist, EngineGone))


def _is_gone_or_down(exc: BaseException) -> bool:
    from sky import exceptions as sky_exc

    return _is_missing(exc) or isinstance(exc, sky_exc.ClusterNotUpError)
