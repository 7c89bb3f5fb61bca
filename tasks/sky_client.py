"""SkyClient: the one seam between llm-gateway and SkyPilot's SDK.

Each method is one SDK call (request id, then `sky.get`), run in a thread because the SDK
blocks. Tests put a fake behind this protocol that returns real SkyPilot records and raises
real `sky.exceptions`; nothing else in the project calls `sky` directly (except rendering a
task with `sky.Task.from_yaml_config`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class SkyClient(Protocol):
    async def launch(self, task: Any, *, cluster_name: str, idle_minutes_to_autostop: int) -> str:
        """Submit a launch (autodown after the idle minutes, whatever the jobs do); returns the
        request id at once."""
        ...

    async def get(self, request_id: str) -> Any:
        """Wait for a request and return its result, or raise its `sky.exceptions` error."""
        ...

    async def api_cancel(self, request_id: str) -> None: ...

    async def status(self, cluster_names: list[str] | None = None) -> list[Any]: ...

    async def endpoints(self, cluster_name: str, port: int) -> dict[int, str]: ...

    async def job_status(self, cluster_name: str, job_ids: list[int]) -> dict[int, Any]: ...

    async def exec(self, task: Any, *, cluster_name: str) -> tuple[int | None, Any]: ...

    async def cancel(self, cluster_name: str, *, job_ids: list[int]) -> None: ...

    async def autostop(self, cluster_name: str, *, idle_minutes: int) -> None:
        """(Re)set autodown after `idle_minutes`, jobs or not: resets the failsafe timer."""
        ...

    async def down(self, cluster_name: str) -> None: ...


class SdkSkyClient:
    """SkyClient on the real SDK. It talks to the API server SkyPilot is configured for (or
    the local one it starts on first use)."""

    def __init__(self) -> None:
        import sky
        from sky.skylet import autostop_lib

        self._sky: Any = sky
        self._no_wait = autostop_lib.AutostopWaitFor.NONE

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        request_id = await asyncio.to_thread(fn, *args, **kwargs)
        return await asyncio.to_thread(self._sky.get, request_id)

    async def launch(self, task: Any, *, cluster_name: str, idle_minutes_to_autostop: int) -> str:
        request_id = await asyncio.to_thread(
            self._sky.launch,
            task,
            cluster_name=cluster_name,
            idle_minutes_to_autostop=idle_minutes_to_autostop,
            down=True,
            wait_for=self._no_wait,
        )
        return str(request_id)

    async def get(self, request_id: str) -> Any:
        return await asyncio.to_thread(self._sky.get, request_id)

    async def api_cancel(self, request_id: str) -> None:
        await self._call(self._sky.api_cancel, request_id, silent=True)

    async def status(self, cluster_names: list[str] | None = None) -> list[Any]:
        return list(await self._call(self._sky.status, cluster_names=cluster_names))

    async def endpoints(self, cluster_name: str, port: int) -> dict[int, str]:
        result = await self._call(self._sky.endpoints, cluster_name, port)
        return {int(k): str(v) for k, v in result.items()}

    async def job_status(self, cluster_name: str, job_ids: list[int]) -> dict[int, Any]:
        return dict(await self._call(self._sky.job_status, cluster_name, job_ids))

    async def exec(self, task: Any, *, cluster_name: str) -> tuple[int | None, Any]:
        job_id, handle = await self._call(self._sky.exec, task, cluster_name=cluster_name)
        return job_id, handle

    async def cancel(self, cluster_name: str, *, job_ids: list[int]) -> None:
        await self._call(self._sky.cancel, cluster_name, job_ids=job_ids)

    async def autostop(self, cluster_name: str, *, idle_minutes: int) -> None:
        await self._call(self._sky.autostop, cluster_name, idle_minutes, wait_for=self._no_wait, down=True)

    async def down(self, cluster_name: str) -> None:
        await self._call(self._sky.down, cluster_name)
