"""SdkSkyClient's threads and timeouts, over an SDK whose calls block like the real one's.

The SDK stand-in has the real SDK's shape (a call returns a request id, `get` blocks until the
request is done); its requests finish when the test says so.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tasks.provider import LaunchSpec, ProviderError
from tasks.sky_client import SdkSkyClient, SkyClientConfig, SkyTimeout
from tasks.sky_task import SkyTaskConfig
from tasks.skypilot import SkyPilotConfig, SkyPilotProvider


class BlockingSdk:
    """Requests are ids; `get` blocks its thread until `release(kind)` (or forever)."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.requests: dict[str, str] = {}
        self.cancelled: list[str] = []
        self.downs: list[str] = []
        self.threads: set[str] = set()

    def gate(self, kind: str) -> threading.Event:
        return self.gates.setdefault(kind, threading.Event())

    def _submit(self, kind: str) -> str:
        self.threads.add(threading.current_thread().name)
        request_id = f"{kind}-{len(self.requests)}"
        self.requests[request_id] = kind
        return request_id

    def launch(self, task: Any, **kwargs: Any) -> str:
        return self._submit("launch")

    def status(self, **kwargs: Any) -> str:
        return self._submit("status")

    def down(self, name: str) -> str:
        self.downs.append(name)
        return self._submit("down")

    def api_cancel(self, request_id: str, silent: bool = False) -> str:
        self.cancelled.append(request_id)
        self.gate(self.requests[request_id]).set()
        return self._submit("api_cancel")

    def get(self, request_id: str) -> Any:
        self.threads.add(threading.current_thread().name)
        kind = self.requests[request_id]
        if kind in ("launch", "status", "down"):
            self.gate(kind).wait(timeout=30)
        if request_id in self.cancelled:
            raise RuntimeError(f"request {request_id} cancelled")
        return {"launch": (1, None), "status": []}.get(kind)


def client(sdk: BlockingSdk, **config: Any) -> SdkSkyClient:
    return SdkSkyClient(SkyClientConfig(**config), sdk=sdk)


async def test_long_waits_use_neither_the_default_pool_nor_the_short_one() -> None:
    sdk = BlockingSdk()
    sky = client(sdk, long_threads=16, short_threads=2)
    try:
        # More launches in provisioning than the default executor has threads (6 on 2 cores).
        ids = [
            await sky.launch(object(), cluster_name=f"c{i}", idle_minutes_to_autostop=5) for i in range(12)
        ]
        waits = [asyncio.create_task(sky.wait_launch(i)) for i in ids]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 2) == "free"
        sdk.gate("status").set()
        assert await asyncio.wait_for(sky.status(), 2) == []
        assert time.monotonic() - t0 < 2
        assert not any(w.done() for w in waits)
        assert {n.split("_")[0] for n in sdk.threads} == {"sky-short", "sky-long"}
        sdk.gate("launch").set()
        assert await asyncio.gather(*waits) == [(1, None)] * 12
    finally:
        sdk.gate("launch").set()
        sky.close()


async def test_a_call_past_its_timeout_is_a_provider_error() -> None:
    sdk = BlockingSdk()
    sky = client(sdk, call_timeout_seconds=0.2, launch_timeout_seconds=0.3, long_timeout_seconds=0.2)
    try:
        with pytest.raises(SkyTimeout, match="status did not finish within 0s"):
            await sky.status()
        request_id = await sky.launch(object(), cluster_name="c", idle_minutes_to_autostop=5)
        with pytest.raises(ProviderError, match="launch did not finish"):
            await sky.wait_launch(request_id)
        with pytest.raises(ProviderError, match="down did not finish"):
            await sky.down("c")
    finally:
        for gate in ("status", "launch", "down"):
            sdk.gate(gate).set()
        sky.close()


async def test_a_launch_that_times_out_is_cancelled_and_downed() -> None:
    sdk = BlockingSdk()
    sdk.gate("down").set()
    sky = client(sdk, launch_timeout_seconds=0.3)
    provider = SkyPilotProvider(sky, SkyPilotConfig(task=SkyTaskConfig(default_accelerators=("A10G",))))
    try:
        with pytest.raises(ProviderError, match="launch did not finish within"):
            await provider.launch(
                LaunchSpec(deployment_id="d1", model="org/m", engine_key="k" * 64, instance_id="i1")
            )
        assert sdk.cancelled == ["launch-0"]  # the request still ran on the API server
        assert len(sdk.downs) == 1 and sdk.downs[0].startswith("llmgw-org-m-")
    finally:
        sdk.gate("launch").set()
        sky.close()
