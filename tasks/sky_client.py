"""SkyClient: the one seam between llm-gateway and SkyPilot's SDK.

Each method is one SDK call (request id, then `sky.get`). The SDK blocks, so `SdkSkyClient` runs
it on thread pools of its own, never on the event loop's default executor (which lease renewal
and the flushes share): a big pool for the waits that last as long as a provisioning or a
teardown (`launch`'s result, `down`, `exec`), a small one for everything else. Every call has a
timeout; a call that runs out of it raises `SkyTimeout`, a `ProviderError`.

Tests put a fake behind this protocol that returns real SkyPilot records and raises real
`sky.exceptions`; nothing else in the project calls `sky` directly (except rendering a task with
`sky.Task.from_yaml_config`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tasks.provider import ProviderError


class SkyTimeout(ProviderError):
    """A SkyPilot call did not finish within its timeout (the API server or cloud hangs)."""


@dataclass(frozen=True)
class SkyClientConfig:
    # Threads for the long waits: one per launch or down in progress. A launch's `sky.get`
    # blocks its thread for the whole provisioning, so this bounds concurrent cold starts.
    long_threads: int = 64
    # Threads for short calls (status, endpoints, job status, autostop, cancel, submits).
    short_threads: int = 8
    call_timeout_seconds: float = 60.0  # one short call (submit and result)
    launch_timeout_seconds: float = 1800.0  # a launch's result: provisioning and setup
    long_timeout_seconds: float = 900.0  # down and exec


class SkyClient(Protocol):
    async def launch(self, task: Any, *, cluster_name: str, idle_minutes_to_autostop: int) -> str:
        """Submit a launch (autodown after the idle minutes, whatever the jobs do); returns the
        request id at once."""
        ...

    async def wait_launch(self, request_id: str) -> tuple[int | None, Any]:
        """Wait for a submitted launch: (job id, handle), or raise its `sky.exceptions` error."""
        ...

    async def api_cancel(self, request_id: str) -> None: ...

    async def api_info(self) -> Any:
        """The API server's `APIHealthResponse` (status, api_version, version)."""
        ...

    async def status(self, cluster_names: list[str] | None = None) -> list[Any]: ...

    async def endpoints(self, cluster_name: str, port: int) -> dict[int, str]: ...

    async def job_status(self, cluster_name: str, job_ids: list[int]) -> dict[int, Any]: ...

    async def exec(self, task: Any, *, cluster_name: str) -> tuple[int | None, Any]: ...

    async def cancel(self, cluster_name: str, *, job_ids: list[int]) -> None: ...

    async def autostop(self, cluster_name: str, *, idle_minutes: int) -> None:
        """(Re)set autodown after `idle_minutes`, jobs or not: resets the failsafe timer."""
        ...

    async def down(self, cluster_name: str) -> None: ...

    async def hourly_price(self, resources: Any) -> float | None:
        """`resources`' price per hour from SkyPilot's catalog (None if it cannot say)."""
        ...

    def close(self) -> None:
        """Stop taking calls (the gateway is shutting down)."""
        ...


def hourly_price(resources: Any) -> float | None:
    """Blocking: reads (and on first use may fetch) the catalog on this host."""
    try:
        return float(resources.get_cost(3600)) if resources is not None else None
    except Exception:  # no instance type / region resolved: the gateway's price table applies
        return None


class SdkSkyClient:
    """SkyClient on the real SDK. It talks to the API server SkyPilot is configured for (or
    the local one it starts on first use)."""

    def __init__(self, config: SkyClientConfig | None = None, *, sdk: Any = None) -> None:
        """`sdk`: the module whose functions are called (default: `sky` itself)."""
        from sky.skylet import autostop_lib

        if sdk is None:
            import sky as sdk

        self.config = config or SkyClientConfig()
        self._sky: Any = sdk
        self._no_wait = autostop_lib.AutostopWaitFor.NONE
        self._short = ThreadPoolExecutor(self.config.short_threads, thread_name_prefix="sky-short")
        self._long = ThreadPoolExecutor(self.config.long_threads, thread_name_prefix="sky-long")

    def close(self) -> None:
        """Stop taking calls; threads still blocked in the SDK finish on their own."""
        for pool in (self._short, self._long):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, pool: ThreadPoolExecutor, limit: float, what: str, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(pool, fn), limit)
        except TimeoutError as exc:
            raise SkyTimeout(f"SkyPilot {what} did not finish within {limit:.0f}s") from exc

    async def _short_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Submit and wait for a quick request, both on the small pool, under one timeout."""

        def call() -> Any:
            return self._sky.get(fn(*args, **kwargs))

        return await self._run(self._short, self.config.call_timeout_seconds, what, call)

    async def _long_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        request_id = await self._run(
            self._short, self.config.call_timeout_seconds, what, functools.partial(fn, *args, **kwargs)
        )
        get = functools.partial(self._sky.get, request_id)
        return await self._run(self._long, self.config.long_timeout_seconds, what, get)

    async def launch(self, task: Any, *, cluster_name: str, idle_minutes_to_autostop: int) -> str:
        submit = functools.partial(
            self._sky.launch,
            task,
            cluster_name=cluster_name,
            idle_minutes_to_autostop=idle_minutes_to_autostop,
            down=True,
            wait_for=self._no_wait,
        )
        return str(await self._run(self._short, self.config.call_timeout_seconds, "launch submit", submit))

    async def wait_launch(self, request_id: str) -> tuple[int | None, Any]:
        get = functools.partial(self._sky.get, request_id)
        job_id, handle = await self._run(self._long, self.config.launch_timeout_seconds, "launch", get)
        return job_id, handle

    async def api_cancel(self, request_id: str) -> None:
        await self._short_call("api_cancel", self._sky.api_cancel, request_id, silent=True)

    async def api_info(self) -> Any:
        return await self._run(self._short, self.config.call_timeout_seconds, "api_info", self._sky.api_info)

    async def status(self, cluster_names: list[str] | None = None) -> list[Any]:
        return list(await self._short_call("status", self._sky.status, cluster_names=cluster_names))

    async def endpoints(self, cluster_name: str, port: int) -> dict[int, str]:
        result = await self._short_call("endpoints", self._sky.endpoints, cluster_name, port)
        return {int(k): str(v) for k, v in result.items()}

    async def job_status(self, cluster_name: str, job_ids: list[int]) -> dict[int, Any]:
        return dict(await self._short_call("job_status", self._sky.job_status, cluster_name, job_ids))

    async def exec(self, task: Any, *, cluster_name: str) -> tuple[int | None, Any]:
        job_id, handle = await self._long_call("exec", self._sky.exec, task, cluster_name=cluster_name)
        return job_id, handle

    async def cancel(self, cluster_name: str, *, job_ids: list[int]) -> None:
        await self._short_call("cancel", self._sky.cancel, cluster_name, job_ids=job_ids)

    async def autostop(self, cluster_name: str, *, idle_minutes: int) -> None:
        await self._short_call(
            "autostop", self._sky.autostop, cluster_name, idle_minutes, wait_for=self._no_wait, down=True
        )

    async def down(self, cluster_name: str) -> None:
        await self._long_call("down", self._sky.down, cluster_name)

    async def hourly_price(self, resources: Any) -> float | None:
        call = functools.partial(hourly_price, resources)
        price: float | None = await self._run(self._short, self.config.call_timeout_seconds, "pricing", call)
        return price
