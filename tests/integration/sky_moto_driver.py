"""Drive SkyPilotProvider through a real SkyPilot API server against a moto EC2.

Run by test_skypilot_moto.py as `unshare -n -- python -m tests.integration.sky_moto_driver OUT`
inside a network namespace that has only loopback, with HOME, TMPDIR and fake AWS credentials
set by the test. Writes what it observed as JSON to OUT; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.moto_cloud import BAD_REGION, GOOD_REGION, instances, setup_cloud, write_sky_home

MOTO_PORT = 5123
INSTANCE_TIMEOUT_S = 300


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def exercise(result: dict[str, Any]) -> None:
    from tasks.provider import CapacityError, LaunchSpec
    from tasks.sky_client import SdkSkyClient
    from tasks.sky_task import SkyTaskConfig
    from tasks.skypilot import SkyPilotConfig, SkyPilotProvider

    client = SdkSkyClient()

    def provider(region: str) -> SkyPilotProvider:
        task = SkyTaskConfig(default_accelerators=("A10G",), infra=f"aws/{region}", disk_size_gb=100)
        return SkyPilotProvider(client, SkyPilotConfig(task=task, failsafe_minutes=10))

    # (a) only the region without an internet gateway is allowed: a capacity failure.
    t0 = time.monotonic()
    try:
        await provider(BAD_REGION).launch(LaunchSpec(deployment_id="capfail1", model="org/capacity-test"))
        result["a"] = {"error": None}
    except CapacityError as exc:
        result["a"] = {"error": "CapacityError", "tried": list(exc.tried), "message": str(exc)}
    except Exception as exc:
        result["a"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["a"]["seconds"] = round(time.monotonic() - t0, 1)
    result["a"]["instances_left"] = [i["InstanceId"] for i in instances(BAD_REGION, include_terminated=False)]

    # (b) the good region: the instance appears in moto with our labels as tags.
    good = provider(GOOD_REGION)
    spec = LaunchSpec(deployment_id="dep12345", model="org/Tiny-Model", priority=1)
    t0 = time.monotonic()
    launch = asyncio.create_task(good.launch(spec))
    instance = None
    while instance is None and time.monotonic() - t0 < INSTANCE_TIMEOUT_S:
        if launch.done():
            launch.result()  # the launch ended early: raise its error
        live = instances(GOOD_REGION, include_terminated=False)
        instance = live[0] if live else None
        await asyncio.sleep(0.5)
    if instance is None:
        raise RuntimeError("no EC2 instance appeared in moto")
    result["b"] = {"instance_seconds": round(time.monotonic() - t0, 1), "instance_id": instance["InstanceId"]}
    tags: dict[str, str] = {}
    for _ in range(60):  # SkyPilot re-tags the head node right after RunInstances
        current = next(i for i in instances(GOOD_REGION) if i["InstanceId"] == instance["InstanceId"])
        tags = {t["Key"]: t["Value"] for t in current.get("Tags", [])}
        if "skypilot-head-node" in tags:
            break
        await asyncio.sleep(0.25)
    result["b"]["tags"] = tags
    listed = await good.list()
    result["b"]["listed"] = [
        {
            "name": i.ref.name,
            "status": i.status,
            "deployment_id": i.ref.deployment_id,
            "labels": i.ref.data["labels"],
        }
        for i in listed
    ]

    # (c) cancel the launch: the provider cancels the request and downs the cluster.
    t0 = time.monotonic()
    launch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await launch
    result["c"] = {
        "seconds": round(time.monotonic() - t0, 1),
        "state": next(
            i["State"]["Name"] for i in instances(GOOD_REGION) if i["InstanceId"] == instance["InstanceId"]
        ),
        "listed_after": [i.ref.name for i in await good.list()],
    }


def main() -> None:
    out = Path(sys.argv[1])
    home = Path(os.environ["HOME"])
    result: dict[str, Any] = {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    write_sky_home(home)
    moto_log = (out.parent / "moto.log").open("wb")
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
        stdout=moto_log,
        stderr=subprocess.STDOUT,
    )
    sky = None
    try:
        wait_http(f"http://127.0.0.1:{MOTO_PORT}/moto-api/", 60)
        setup_cloud(home)
        import sky as sky_sdk

        sky = sky_sdk
        t0 = time.monotonic()
        sky.api_start(host="127.0.0.1")
        result["api_start_seconds"] = round(time.monotonic() - t0, 1)
        asyncio.run(exercise(result))
    except BaseException:
        result["exception"] = traceback.format_exc()
    finally:
        if sky is not None:
            try:
                sky.api_stop()
            except Exception as exc:
                result["api_stop_error"] = repr(exc)
        moto.terminate()
        try:
            moto.wait(10)
        except subprocess.TimeoutExpired:
            moto.kill()
            moto.wait()
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
