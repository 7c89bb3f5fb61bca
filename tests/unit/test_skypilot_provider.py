"""SkyPilotProvider over a fake SkyClient that speaks in real SkyPilot objects and exceptions."""

from __future__ import annotations

import asyncio

import pytest
from sky import exceptions as sky_exc
from sky.skylet.job_lib import JobStatus
from sky.utils.status_lib import ClusterStatus

from tasks.provider import CapacityError, ClusterRef, EngineExited, LaunchSpec, ProviderError
from tasks.sky_client import SdkSkyClient
from tasks.sky_task import SkyTaskConfig
from tasks.skypilot import SkyPilotConfig, SkyPilotProvider, regions_tried
from tests.fake_sky import FakeCluster, FakeSkyClient

CONFIG = SkyPilotConfig(
    task=SkyTaskConfig(default_accelerators=("A10G",)), failsafe_minutes=15, job_check_seconds=0.05
)


def spec(model: str = "org/m", dep: str = "d1", gpus: int = 1) -> LaunchSpec:
    return LaunchSpec(deployment_id=dep, model=model, gpus=gpus)


def stub_address(url: str) -> str:
    return url.removeprefix("http://")


async def test_launch_wait_ready_heartbeat_stop(stub_url: str) -> None:
    client = FakeSkyClient(endpoint=stub_address(stub_url))
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec())
    assert ref.name.startswith("llmgw-org-m-") and ref.data["job_id"] == 1
    assert ref.data["accelerators"] == {"A10G": 1}
    assert client.calls[0] == ("launch", ref.name, 15)  # autodown after failsafe_minutes
    endpoint = await asyncio.wait_for(provider.wait_ready(ref), 10)
    assert endpoint.base_url == stub_url
    assert await provider.probe(ref) == endpoint
    await provider.heartbeat(ref)
    assert ("autostop", ref.name, 15) in client.calls
    assert provider.heartbeat_interval_seconds == 15 * 60 / 3
    [info] = await provider.list()
    assert info.ref.name == ref.name and info.status == "UP" and info.ref.deployment_id == "d1"
    await provider.stop(ref)
    assert client.clusters == {}
    await provider.stop(ref)  # a cluster already gone is not an error
    assert await provider.probe(ref) is None


async def test_capacity_error_names_regions_and_cleans_up() -> None:
    history = [
        sky_exc.ResourcesUnavailableError("Failed to acquire resources in us-east-1 for {A10G:1}"),
        sky_exc.ResourcesUnavailableError("Failed to acquire resources in us-west-2 for {A10G:1}"),
    ]
    error = sky_exc.ResourcesUnavailableError(
        "Failed to provision all possible launchable resources.", failover_history=history
    )
    client = FakeSkyClient(launch_error=error)
    with pytest.raises(CapacityError) as info:
        await SkyPilotProvider(client, CONFIG).launch(spec())
    assert info.value.tried == ("us-east-1", "us-west-2")
    assert "us-east-1, us-west-2" in str(info.value)
    assert [c[0] for c in client.calls] == ["launch", "down"]
    assert regions_tried(sky_exc.ResourcesUnavailableError("x")) == ()


async def test_other_errors_become_provider_errors_and_cleanup() -> None:
    client = FakeSkyClient(
        launch_error=sky_exc.NoCloudAccessError("No cloud access available for launching.")
    )
    with pytest.raises(ProviderError, match="NoCloudAccessError: No cloud access") as info:
        await SkyPilotProvider(client, CONFIG).launch(spec())
    assert not isinstance(info.value, CapacityError)
    assert client.calls[-1][0] == "down"


async def test_cancelled_launch_cancels_the_request_and_downs_the_cluster() -> None:
    client = FakeSkyClient(launch_gate=asyncio.Event())
    provider = SkyPilotProvider(client, CONFIG)
    task = asyncio.create_task(provider.launch(spec()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kinds = [c[0] for c in client.calls]
    assert kinds == ["launch", "api_cancel", "down"]


async def test_failed_vllm_job_ends_the_wait() -> None:
    client = FakeSkyClient(endpoint="127.0.0.1:9")  # /health never answers
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec())
    client.clusters[ref.name].jobs[1] = JobStatus.FAILED
    with pytest.raises(EngineExited, match="ended: FAILED"):
        await asyncio.wait_for(provider.wait_ready(ref), 5)
    del client.clusters[ref.name]
    with pytest.raises(ProviderError, match="ClusterDoesNotExist"):
        await provider.wait_ready(ref)


async def test_swap_cancels_the_job_and_execs_with_the_clusters_accelerators() -> None:
    client = FakeSkyClient()
    provider = SkyPilotProvider(client, CONFIG)
    old = await provider.launch(spec("org/low", "d1"))
    new = await provider.swap(old, spec("org/high", "d2"))
    assert (new.name, new.deployment_id, new.data["job_id"], new.data["model"]) == (
        old.name,
        "d2",
        2,
        "org/high",
    )
    assert ("cancel", old.name, (1,)) in client.calls
    exec_task = client.tasks[-1]
    assert [r.accelerators for r in exec_task.resources] == [{"A10G": 1}]
    assert exec_task.envs["MODEL_ID"] == "org/high"
    with pytest.raises(CapacityError, match="needs 4"):
        await provider.swap(new, spec("org/big", "d3", gpus=4))


async def test_list_shows_only_our_clusters() -> None:
    client = FakeSkyClient()
    provider = SkyPilotProvider(client, CONFIG)
    ours = await provider.launch(spec())
    client.clusters["someone-else"] = FakeCluster(
        name="someone-else", labels={"team": "x"}, resources=None, endpoint="", status=ClusterStatus.STOPPED
    )
    assert [i.ref.name for i in await provider.list()] == [ours.name]


async def test_real_sdk_client_errors_are_mapped() -> None:
    """The real SDK against a dead API server endpoint: a real exception, mapped at the seam."""
    provider = SkyPilotProvider(SdkSkyClient(), CONFIG)
    with pytest.raises(ProviderError, match="ApiServerConnectionError"):
        await provider.list()
    with pytest.raises(ProviderError):
        await provider.stop(ClusterRef(provider="skypilot", name="llmgw-x-1", deployment_id="d"))
