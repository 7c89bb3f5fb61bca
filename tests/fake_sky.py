"""FakeSkyClient: the SkyClient seam with real SkyPilot objects behind it.

Tasks are real `sky.Task`s, status records are real `StatusResponse`s, errors are real
`sky.exceptions`, the launch handle carries the task's real `sky.Resources`. Only the cloud is
missing: a launched cluster's endpoint is whatever the test says (usually a stub upstream).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sky import exceptions as sky_exc
from sky.schemas.api.responses import APIHealthResponse, StatusResponse
from sky.server.common import ApiServerStatus
from sky.skylet.job_lib import JobStatus
from sky.utils.status_lib import ClusterStatus

from tasks.sky_client import hourly_price


@dataclass
class FakeCluster:
    name: str
    labels: dict[str, str]
    resources: Any
    endpoint: str
    jobs: dict[int, JobStatus] = field(default_factory=dict)
    status: ClusterStatus = ClusterStatus.UP
    autostop: int = 30  # minutes; -1: off
    to_down: bool = True
    head_ip: str = "127.0.0.1"

    def record(self) -> StatusResponse:
        return StatusResponse(
            name=self.name,
            launched_at=1_700_000_000,
            handle=SimpleNamespace(launched_resources=self.resources, head_ip=self.head_ip),
            status=self.status,
            autostop=self.autostop,
            to_down=self.to_down,
            cluster_hash="h",
            cluster_ever_up=True,
            user_hash="u",
            user_name="test",
            workspace="default",
            is_managed=False,
            nodes=1,
            labels=self.labels,
        )


@dataclass
class FakeSkyClient:
    endpoint: str = "127.0.0.1:9"
    api_version: str = "62"
    endpoint_misses: int = 0  # endpoints() answers {} this many times first (a k8s LoadBalancer)
    launch_error: Exception | None = None
    launch_gate: asyncio.Event | None = None  # a launch's get() waits for it when set
    clusters: dict[str, FakeCluster] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    tasks: list[Any] = field(default_factory=list)
    _requests: dict[str, tuple[str, Any]] = field(default_factory=dict)
    _cancelled: set[str] = field(default_factory=set)
    _autostop: dict[str, int] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def _cluster(self, name: str) -> FakeCluster:
        if name not in self.clusters:
            raise sky_exc.ClusterDoesNotExist(f"Cluster {name!r} does not exist.")
        return self.clusters[name]

    async def launch(self, task: Any, *, cluster_name: str, idle_minutes_to_autostop: int) -> str:
        self.calls.append(("launch", cluster_name, idle_minutes_to_autostop))
        self.tasks.append(task)
        request_id = f"req-{next(self._ids)}"
        self._requests[request_id] = (cluster_name, task)
        self._autostop[request_id] = idle_minutes_to_autostop
        return request_id

    async def wait_launch(self, request_id: str) -> tuple[int | None, Any]:
        name, task = self._requests[request_id]
        if self.launch_gate is not None:
            await self.launch_gate.wait()
        if request_id in self._cancelled:
            raise sky_exc.RequestCancelled(f"Request {request_id} cancelled")
        if self.launch_error is not None:
            raise self.launch_error
        resources = next(iter(task.resources))
        self.clusters[name] = FakeCluster(
            name=name,
            labels=dict(resources.labels or {}),
            resources=resources,
            endpoint=self.endpoint,
            jobs={1: JobStatus.RUNNING},
            autostop=self._autostop.pop(request_id),
        )
        return 1, SimpleNamespace(launched_resources=resources)

    async def hourly_price(self, resources: Any) -> float | None:
        return hourly_price(resources)

    async def api_info(self) -> APIHealthResponse:
        return APIHealthResponse(
            status=ApiServerStatus.HEALTHY, api_version=self.api_version, version="0.14.1", commit="c"
        )

    def close(self) -> None:
        self.calls.append(("close",))

    async def api_cancel(self, request_id: str) -> None:
        self.calls.append(("api_cancel", request_id))
        self._cancelled.add(request_id)

    async def status(self, cluster_names: list[str] | None = None) -> list[Any]:
        return [
            c.record() for c in self.clusters.values() if cluster_names is None or c.name in cluster_names
        ]

    async def endpoints(self, cluster_name: str, port: int) -> dict[int, str]:
        cluster = self._cluster(cluster_name)
        self.calls.append(("endpoints", cluster_name, port))
        if self.endpoint_misses > 0:
            self.endpoint_misses -= 1
            return {}
        return {port: cluster.endpoint}

    async def job_status(self, cluster_name: str, job_ids: list[int]) -> dict[int, Any]:
        jobs = self._cluster(cluster_name).jobs
        return {j: jobs.get(j) for j in job_ids}

    async def exec(self, task: Any, *, cluster_name: str) -> tuple[int | None, Any]:
        cluster = self._cluster(cluster_name)
        self.calls.append(("exec", cluster_name))
        self.tasks.append(task)
        job_id = max(cluster.jobs, default=0) + 1
        cluster.jobs[job_id] = JobStatus.RUNNING
        return job_id, SimpleNamespace(launched_resources=cluster.resources)

    async def cancel(self, cluster_name: str, *, job_ids: list[int]) -> None:
        cluster = self._cluster(cluster_name)
        self.calls.append(("cancel", cluster_name, tuple(job_ids)))
        for job in job_ids:
            cluster.jobs[job] = JobStatus.CANCELLED

    async def autostop(self, cluster_name: str, *, idle_minutes: int) -> None:
        cluster = self._cluster(cluster_name)
        self.calls.append(("autostop", cluster_name, idle_minutes))
        cluster.autostop, cluster.to_down = idle_minutes, True

    async def down(self, cluster_name: str) -> None:
        self.calls.append(("down", cluster_name))
        self._cluster(cluster_name)
        del self.clusters[cluster_name]
