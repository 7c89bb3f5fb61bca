"""SkyPilotProvider over a fake SkyClient that speaks in real SkyPilot objects and exceptions,
with real stub engines (tests/stub_upstream.py) as the clusters' endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sky import exceptions as sky_exc
from sky.skylet.job_lib import JobStatus
from sky.utils.status_lib import ClusterStatus

from tasks.provider import (
    CapacityError,
    ClusterRef,
    EngineExited,
    EngineGone,
    LaunchSpec,
    ProviderError,
)
from tasks.sky_client import SdkSkyClient
from tasks.sky_task import LABEL_INSTANCE, SkyTaskConfig
from tasks.skypilot import SkyPilotConfig, SkyPilotProvider, regions_tried
from tests.fake_sky import FakeCluster, FakeSkyClient
from tests.stub_upstream import make_app, serve_in_thread

CONFIG = SkyPilotConfig(
    task=SkyTaskConfig(default_accelerators=("A10G",)),
    failsafe_minutes=15,
    job_check_seconds=0.05,
    endpoint_retry_seconds=0.05,
)
INSTANCE = "inst0123abcd"
KEY = "9f" * 32


def spec(model: str = "org/m", dep: str = "d1", gpus: int = 1, instance: str = INSTANCE) -> LaunchSpec:
    return LaunchSpec(deployment_id=dep, model=model, gpus=gpus, engine_key=KEY, instance_id=instance)


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, str]]:
    """Stub engines serving one model each, by model: their address as SkyPilot gives it."""
    with (
        serve_in_thread(make_app("org/m")) as m,
        serve_in_thread(make_app("org/low")) as low,
        serve_in_thread(make_app("org/high")) as high,
    ):
        yield {
            name: url.removeprefix("http://")
            for name, url in [("org/m", m), ("org/low", low), ("org/high", high)]
        }


async def test_launch_wait_ready_heartbeat_stop(engines: dict[str, str]) -> None:
    client = FakeSkyClient(endpoint=engines["org/m"])
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec())
    assert ref.name.startswith("llmgw-org-m-") and ref.data["job_id"] == 1
    assert ref.data["accelerators"] == {"A10G": 1} and ref.engine_key == KEY
    assert client.calls[0] == ("launch", ref.name, 15)  # autodown after failsafe_minutes
    endpoint = await asyncio.wait_for(provider.wait_ready(ref), 10)
    assert endpoint.base_url == f"http://{engines['org/m']}"
    assert await provider.probe(ref) == endpoint
    assert await provider.probe_loading(ref) == "ready"
    await provider.heartbeat(ref)
    assert ("autostop", ref.name, 15) in client.calls
    assert provider.heartbeat_interval_seconds == 15 * 60 / 3
    [info] = await provider.list(INSTANCE)
    assert info.ref.name == ref.name and info.status == "UP" and info.ref.deployment_id == "d1"
    await provider.stop(ref)
    assert client.clusters == {}
    await provider.stop(ref)  # a cluster already gone is not an error
    assert await provider.probe(ref) is None
    await provider.close()
    assert client.calls[-1] == ("close",)


async def test_no_cluster_without_an_engine_key_or_the_instance_label() -> None:
    client = FakeSkyClient()
    provider = SkyPilotProvider(client, CONFIG)
    with pytest.raises(ProviderError, match="no engine key"):
        await provider.launch(LaunchSpec(deployment_id="d1", model="org/m", instance_id=INSTANCE))
    with pytest.raises(ProviderError, match="no instance id"):
        await provider.launch(LaunchSpec(deployment_id="d1", model="org/m", engine_key=KEY))
    assert client.calls == []


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


async def test_nothing_feasible_is_a_configuration_error_not_capacity() -> None:
    """An empty failover history: the optimizer found no candidate (unknown GPU, no cloud)."""
    error = sky_exc.ResourcesUnavailableError(
        "Catalog does not contain any instances satisfying the request: 1x AWS({'H999': 1}).",
        failover_history=[],
    )
    client = FakeSkyClient(launch_error=error)
    with pytest.raises(ProviderError, match="no feasible resources: Catalog does not contain") as info:
        await SkyPilotProvider(client, CONFIG).launch(spec())
    assert not isinstance(info.value, CapacityError)
    assert [c[0] for c in client.calls] == ["launch", "down"]


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


async def test_the_endpoint_is_asked_for_again_until_it_exists(engines: dict[str, str]) -> None:
    """A k8s LoadBalancer has no address for a while: SkyPilot answers {} meanwhile."""
    client = FakeSkyClient(endpoint=engines["org/m"], endpoint_misses=3)
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec())
    endpoint = await asyncio.wait_for(provider.wait_ready(ref), 10)
    assert endpoint.base_url == f"http://{engines['org/m']}"
    assert len([c for c in client.calls if c[0] == "endpoints"]) == 4


async def test_ready_only_when_the_engine_names_the_model(engines: dict[str, str]) -> None:
    """After a swap the old engine may still answer /health: that is not the new one."""
    client = FakeSkyClient(endpoint=engines["org/low"])
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec("org/high"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(provider.wait_ready(ref), 1.0)
    client.clusters[ref.name].endpoint = engines["org/high"]
    await asyncio.wait_for(provider.wait_ready(ref), 10)


async def test_failed_vllm_job_ends_the_wait_and_a_gone_cluster_is_engine_gone() -> None:
    client = FakeSkyClient(endpoint="127.0.0.1:9")  # /health never answers
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec())
    client.clusters[ref.name].jobs[1] = JobStatus.FAILED
    with pytest.raises(EngineExited, match=r"\(deployment d1\) ended: vLLM job 1 on .* is FAILED"):
        await asyncio.wait_for(provider.wait_ready(ref), 5)
    assert await provider.probe_loading(ref) == "dead"
    del client.clusters[ref.name]
    with pytest.raises(EngineGone):
        await provider.wait_ready(ref)
    with pytest.raises(EngineGone):  # a preempted cluster: the gateway marks the deployment failed
        await provider.heartbeat(ref)
    assert await provider.probe_loading(ref) == "dead"


async def test_a_cluster_still_loading_is_told_apart_from_a_dead_one() -> None:
    client = FakeSkyClient(endpoint="127.0.0.1:9")  # vLLM still loads: /health does not answer
    provider = SkyPilotProvider(client, CONFIG)
    ref = await provider.launch(spec())
    assert await provider.probe_loading(ref) == "loading"
    client.clusters[ref.name].jobs[1] = JobStatus.SETTING_UP
    assert await provider.probe_loading(ref) == "loading"
    client.clusters[ref.name].jobs[1] = JobStatus.CANCELLED
    assert await provider.probe_loading(ref) == "dead"
    [adopted] = await provider.list(INSTANCE)  # no job id: the cluster's status decides
    assert adopted.ref.data.get("job_id") is None
    assert await provider.probe_loading(adopted.ref) == "loading"
    client.clusters[ref.name].status = ClusterStatus.INIT
    assert await provider.probe_loading(adopted.ref) == "dead"


async def test_swap_pins_the_requesters_gpus_and_keeps_the_clusters_price(engines: dict[str, str]) -> None:
    """A 1-GPU model onto a 4-GPU cluster: exec asks for 1 of the 4 (tensor parallelism 1)."""
    client = FakeSkyClient(endpoint=engines["org/low"])
    provider = SkyPilotProvider(client, CONFIG)
    old = await provider.launch(spec("org/low", "d1", gpus=4))
    assert old.data["accelerators"] == {"A10G": 4}
    old = ClusterRef(**{**vars(old), "data": {**old.data, "hourly_price": 5.672}})
    new = await provider.swap(old, spec("org/high", "d2", gpus=1))
    assert (new.name, new.deployment_id, new.data["job_id"], new.data["model"], new.gpus) == (
        old.name,
        "d2",
        2,
        "org/high",
        1,
    )
    assert new.data["hourly_price"] == 5.672 and new.data["accelerators"] == {"A10G": 4}
    assert ("cancel", old.name, (1,)) in client.calls
    exec_task = client.tasks[-1]
    assert [r.accelerators for r in exec_task.resources] == [{"A10G": 1}]
    assert exec_task.envs["MODEL_ID"] == "org/high" and "LLMGW_ENGINE_KEY" not in exec_task.envs
    client.clusters[old.name].endpoint = engines["org/high"]
    await asyncio.wait_for(provider.wait_ready(new), 10)
    with pytest.raises(CapacityError, match="needs 8"):
        await provider.swap(new, spec("org/big", "d3", gpus=8))


async def test_list_shows_only_this_installations_clusters(engines: dict[str, str]) -> None:
    client = FakeSkyClient()
    provider = SkyPilotProvider(client, CONFIG)
    ours = await provider.launch(spec())
    theirs = await provider.launch(spec("org/m", "d9", instance="staging0000x"))
    client.clusters["someone-else"] = FakeCluster(
        name="someone-else", labels={"team": "x"}, resources=None, endpoint="", status=ClusterStatus.STOPPED
    )
    [info] = await provider.list(INSTANCE)
    assert info.ref.name == ours.name
    assert info.ref.data["labels"][LABEL_INSTANCE] == INSTANCE
    assert info.ref.data["accelerators"] == {"A10G": 1}  # from the launched resources: swappable
    assert [i.ref.name for i in await provider.list("staging0000x")] == [theirs.name]
    with pytest.raises(ProviderError, match="installation's id"):
        await provider.list()


async def test_check_failsafe_rearms_autodown_where_it_is_off() -> None:
    client = FakeSkyClient()
    provider = SkyPilotProvider(client, CONFIG)
    armed = await provider.launch(spec("org/a", "d1"))
    off = await provider.launch(spec("org/b", "d2"))
    client.clusters[off.name].autostop = -1
    client.calls.clear()
    found = await provider.check_failsafe(INSTANCE)
    assert client.calls == [("autostop", off.name, 15)]
    assert found[0].startswith("SkyPilot API server 0.14.1 (API version 62)")
    assert any(armed.name in line and "autodown after 15 min" in line for line in found)
    assert any(off.name in line and "re-armed" in line for line in found)
    assert client.clusters[off.name].autostop == 15


async def test_check_failsafe_refuses_an_api_server_that_drops_wait_for() -> None:
    client = FakeSkyClient(api_version="12")
    with pytest.raises(ProviderError, match=r"API version 12.*needs API version >= 13"):
        await SkyPilotProvider(client, CONFIG).check_failsafe(INSTANCE)


async def test_private_network_reaches_the_head_node_without_a_port() -> None:
    config = SkyPilotConfig(task=SkyTaskConfig(default_accelerators=("A10G",), network="private"))
    client = FakeSkyClient()
    provider = SkyPilotProvider(client, config)
    ref = await provider.launch(spec())
    [resources] = list(client.tasks[0].resources)
    assert not resources.ports  # nothing is opened to the internet
    client.clusters[ref.name].head_ip = "10.0.3.17"
    assert (await provider._endpoint(ref)).base_url == "http://10.0.3.17:8000"


async def test_real_sdk_client_errors_are_mapped() -> None:
    """The real SDK against a dead API server endpoint: a real exception, mapped at the seam."""
    provider = SkyPilotProvider(SdkSkyClient(), CONFIG)
    with pytest.raises(ProviderError, match="ApiServerConnectionError"):
        await provider.list(INSTANCE)
    with pytest.raises(ProviderError):
        await provider.stop(ClusterRef(provider="skypilot", name="llmgw-x-1", deployment_id="d"))
    with pytest.raises(ProviderError, match="API server check: ConnectionError"):
        await provider.check_failsafe(INSTANCE)
    await provider.close()


def test_fits_counts_the_clusters_gpus_and_the_models_types() -> None:
    """What a spare cluster can take: enough GPUs of a type the model allows."""
    provider = SkyPilotProvider(FakeSkyClient(), CONFIG)
    ref = ClusterRef(
        provider="skypilot", name="c", deployment_id="d1", gpus=1, data={"accelerators": {"L4": 2}}
    )
    assert provider.fits(ref, spec(gpus=2)) and not provider.fits(ref, spec(gpus=4))
    h100 = LaunchSpec(
        deployment_id="d2", model="m", accelerators=("H100",), engine_key=KEY, instance_id=INSTANCE
    )
    l4 = LaunchSpec(
        deployment_id="d3", model="m", accelerators=("L4", "A10G"), engine_key=KEY, instance_id=INSTANCE
    )
    assert not provider.fits(ref, h100) and provider.fits(ref, l4)
    assert not provider.fits(ClusterRef(provider="skypilot", name="c", deployment_id="d1"), spec())
