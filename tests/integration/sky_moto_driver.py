"""Drive SkyPilotProvider through a real SkyPilot API server against a moto EC2 and S3.

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

from tests.integration.moto_cloud import (
    BAD_REGION,
    GOOD_REGION,
    instances,
    make_buckets,
    setup_cloud,
    write_sky_home,
)

MOTO_PORT = 5123
INSTANCE_TIMEOUT_S = 300
INSTANCE = "itest0000001"  # this installation
OTHER_INSTANCE = "itest0000002"  # a staging gateway on the same SkyPilot user
KEY = "ab12" * 16
CACHE_BUCKET = "llmgw-cache"
WEIGHTS_URI = "s3://llmgw-weights/org/Tiny-Model"


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


def spec(dep: str, model: str = "org/Tiny-Model", instance: str = INSTANCE, **kw: Any) -> Any:
    from tasks.provider import LaunchSpec

    return LaunchSpec(deployment_id=dep, model=model, engine_key=KEY, instance_id=instance, **kw)


def task_config(region: str, **kw: Any) -> Any:
    from tasks.sky_task import SkyTaskConfig

    return SkyTaskConfig(default_accelerators=("A10G",), infra=f"aws/{region}", disk_size_gb=100, **kw)


def provider(client: Any, region: str = GOOD_REGION) -> Any:
    from tasks.skypilot import SkyPilotConfig, SkyPilotProvider

    return SkyPilotProvider(client, SkyPilotConfig(task=task_config(region), failsafe_minutes=10))


async def wait_instances(count: int, launches: list[asyncio.Task[Any]] = ()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    t0 = time.monotonic()
    while time.monotonic() - t0 < INSTANCE_TIMEOUT_S:
        for launch in launches:
            if launch.done():
                launch.result()  # a launch ended early: raise its error
        live = instances(GOOD_REGION, include_terminated=False)
        if len(live) >= count:
            return live
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{count} EC2 instances did not appear in moto")


async def capacity(client: Any, result: dict[str, Any]) -> None:
    """(a) only the region without an internet gateway is allowed: a capacity failure."""
    from tasks.provider import CapacityError

    t0 = time.monotonic()
    try:
        await provider(client, BAD_REGION).launch(spec("capfail1", "org/capacity-test"))
        result["a"] = {"error": None}
    except CapacityError as exc:
        result["a"] = {"error": "CapacityError", "tried": list(exc.tried), "message": str(exc)}
    except Exception as exc:
        result["a"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["a"]["seconds"] = round(time.monotonic() - t0, 1)
    result["a"]["instances_left"] = [i["InstanceId"] for i in instances(BAD_REGION, include_terminated=False)]


async def dry_runs(result: dict[str, Any]) -> None:
    """Every render the gateway can make, through the server's validation and optimizer."""
    import sky

    from tasks.sky_task import render_task

    renders = {
        "pip_labels": (task_config(GOOD_REGION, extra_labels={"team": "nlp"}), spec("dry00001", priority=7)),
        "image": (task_config(GOOD_REGION, image="vllm/vllm-openai:v0.32.0"), spec("dry00002")),
        "uv_disk_tier_spot": (
            task_config(GOOD_REGION, install="uv", disk_tier="high", use_spot=True),
            spec("dry3"),
        ),
        "weight_store": (
            task_config(GOOD_REGION, cache_uri=f"s3://{CACHE_BUCKET}"),
            spec("dry4", weights_uri=WEIGHTS_URI),
        ),
        "private": (task_config(GOOD_REGION, network="private"), spec("dry00005")),
        "exec_pin": (task_config(GOOD_REGION), spec("dry00007")),
    }

    async def dry_run(name: str, config: Any, launch_spec: Any) -> str:
        pin = {"A10G": 1} if name == "exec_pin" else None
        task = render_task(launch_spec, config, accelerators=pin)
        try:
            request = await asyncio.to_thread(
                sky.launch, task, cluster_name=f"llmgw-dry-{name}".replace("_", "-"), dryrun=True
            )
            await asyncio.to_thread(sky.get, request)
            return "ok"
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc)[:300]}"

    answers = await asyncio.gather(*(dry_run(name, *render) for name, render in renders.items()))
    out = dict(zip(renders, answers, strict=True))
    result["dry_runs"] = out
    result["dry_run_instances"] = len(instances(GOOD_REGION, include_terminated=False))


async def init_cluster_calls(good: Any, ref: Any) -> dict[str, Any]:
    """What each call does on a cluster that is not up (INIT: no SSH in moto)."""
    from tasks.provider import ProviderError
    from tasks.sky_client import SdkSkyClient, SkyClientConfig

    out: dict[str, Any] = {"probe": repr(await good.probe(ref))}
    # An exec waits for the cluster's lock, which the launch holds: a client with a short
    # timeout shows that a hung call ends as a ProviderError.
    impatient = provider(SdkSkyClient(SkyClientConfig(long_timeout_seconds=5, call_timeout_seconds=20)))
    calls = {
        "heartbeat": lambda: good.heartbeat(ref),
        "probe_loading": lambda: good.probe_loading(ref),
        "swap": lambda: impatient.swap(ref, spec("swap0001", "org/Other-Model")),
        "endpoint": lambda: good._endpoint(ref),
    }
    for name, call in calls.items():
        try:
            out[name] = {"returned": repr(await asyncio.wait_for(call(), 120))}
        except ProviderError as exc:
            out[name] = {"error": type(exc).__name__, "message": str(exc)[:300]}
        except Exception as exc:  # not mapped at the seam: the test fails on it
            out[name] = {"unmapped": f"{type(exc).__name__}: {exc}"[:300]}
    impatient.client.close()
    return out


async def launch_list_cancel(client: Any, result: dict[str, Any]) -> None:
    """(b) a launch's instance carries our labels as tags, and calls on the INIT cluster map to
    ours; (c) cancelling the launch terminates the instance."""
    good = provider(client)
    t0 = time.monotonic()
    launch = asyncio.create_task(good.launch(spec("dep12345", priority=1)))
    [instance] = await wait_instances(1, [launch])
    result["b"] = {"instance_seconds": round(time.monotonic() - t0, 1), "instance_id": instance["InstanceId"]}
    tags: dict[str, str] = {}
    for _ in range(60):  # SkyPilot re-tags the head node right after RunInstances
        current = next(i for i in instances(GOOD_REGION) if i["InstanceId"] == instance["InstanceId"])
        tags = {t["Key"]: t["Value"] for t in current.get("Tags", [])}
        if "skypilot-head-node" in tags:
            break
        await asyncio.sleep(0.25)
    result["b"]["tags"] = tags
    listed = await good.list(INSTANCE)
    result["b"]["listed"] = [
        {
            "name": i.ref.name,
            "status": i.status,
            "deployment_id": i.ref.deployment_id,
            "labels": i.ref.data["labels"],
            "accelerators": i.ref.data["accelerators"],
            "hourly_price": i.ref.data["hourly_price"],
        }
        for i in listed
    ]
    result["b"]["init_calls"] = await init_cluster_calls(good, listed[0].ref)
    result["b"]["failsafe"] = await good.check_failsafe(INSTANCE)
    t0 = time.monotonic()
    launch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await launch
    result["c"] = {
        "seconds": round(time.monotonic() - t0, 1),
        "state": next(
            i["State"]["Name"] for i in instances(GOOD_REGION) if i["InstanceId"] == instance["InstanceId"]
        ),
        "listed_after": [i.ref.name for i in await good.list(INSTANCE)],
    }


async def reconcile(client: Any, result: dict[str, Any]) -> None:
    """A gateway died with launches in flight: its known cluster and an unknown one carrying its
    label are listed and downed; a staging gateway's cluster is never listed nor touched."""
    from tasks.sky_task import cluster_name, render_task

    specs = {
        "known": spec("known001"),
        "unknown": spec("unkn0002", "org/Unknown-Model"),
        "staging": spec("stag0003", instance=OTHER_INSTANCE),
    }
    requests = {}
    for role, launch_spec in specs.items():
        task = render_task(launch_spec, task_config(GOOD_REGION))
        requests[role] = await client.launch(
            task, cluster_name=cluster_name(launch_spec), idle_minutes_to_autostop=10
        )
    live = await wait_instances(3)
    for request_id in requests.values():  # the dead gateway's requests end with it
        await client.api_cancel(request_id)
    good = provider(client)
    listed = await good.list(INSTANCE)
    t0 = time.monotonic()
    for info in listed:  # what reconcile does with each: down it
        await good.stop(info.ref)
    by_id = {i["InstanceId"]: i for i in instances(GOOD_REGION)}
    result["reconcile"] = {
        "listed": sorted(i.ref.deployment_id for i in listed),
        "statuses": sorted(i.status for i in listed),
        "down_seconds": round(time.monotonic() - t0, 1),
        "states": {
            {t["Key"]: t["Value"] for t in by_id[i["InstanceId"]].get("Tags", [])}.get(
                "llmgw-deployment", "?"
            ): by_id[i["InstanceId"]]["State"]["Name"]
            for i in live
        },
        "staging_listed": [i.ref.deployment_id for i in await good.list(OTHER_INSTANCE)],
    }
    await good.stop(specs_ref(good, specs["staging"]))  # clean up the staging one too


def specs_ref(good: Any, launch_spec: Any) -> Any:
    from tasks.provider import ClusterRef
    from tasks.sky_task import cluster_name

    return ClusterRef(
        provider=good.name, name=cluster_name(launch_spec), deployment_id=launch_spec.deployment_id
    )


async def pricing(client: Any, result: dict[str, Any]) -> None:
    import sky

    resources = sky.Resources(infra=f"aws/{GOOD_REGION}", instance_type="g5.xlarge")
    result["price_g5_xlarge"] = await client.hourly_price(resources)


async def exercise(result: dict[str, Any]) -> None:
    from tasks.sky_client import SdkSkyClient

    client = SdkSkyClient()
    result["seconds"] = {}
    parts = [
        ("pricing", lambda: pricing(client, result)),
        ("dry_runs", lambda: dry_runs(result)),
        ("capacity", lambda: capacity(client, result)),
        ("launch_list_cancel", lambda: launch_list_cancel(client, result)),
        ("reconcile", lambda: reconcile(client, result)),
    ]
    try:
        for name, part in parts:
            t0 = time.monotonic()
            await part()
            result["seconds"][name] = round(time.monotonic() - t0, 1)
    finally:
        client.close()


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
        make_buckets(GOOD_REGION, [CACHE_BUCKET, "llmgw-weights"])
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
