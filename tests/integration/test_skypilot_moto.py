"""SkyPilotProvider through a real SkyPilot API server against a moto EC2 and S3, offline.

Everything runs in a network namespace with loopback only (`unshare -n`, needs root, as in CI):
moto on 127.0.0.1, a real `sky api start`, real launches that create EC2 instances in moto.
The instances never reach UP (there is no SSH), so every launch is cancelled once it exists;
what needs UP (endpoints, jobs, a swap that runs) is not proven here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.moto_cloud import BAD_REGION

ROOT = Path(__file__).parents[2]
RUN_TAG = "LLMGW_INTEGRATION_RUN"

pytestmark = pytest.mark.integration


def processes_tagged(value: str) -> list[int]:
    """Live processes whose environment carries this run's tag (all that the run started)."""
    needle = f"{RUN_TAG}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace (`unshare -n`); CI runs as root")
    for tool in ("unshare", "ip", "rsync"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is missing (apt-get install util-linux iproute2 rsync)")
    work = tmp_path_factory.mktemp("skymoto")
    (work / "home").mkdir()
    (work / "tmp").mkdir()
    out = work / "result.json"
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(work / "home"),
        "TMPDIR": str(work / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        RUN_TAG: str(work),
        # Read by the API server, which is the process that talks to "AWS".
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5123",
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        # The API server builds a SkyPilot wheel with pip on the first launch: no index, no
        # version check, and no isolated build (it would fetch setuptools): the venv's is used.
        # pip reads its "no-" switches inverted from the environment: 0 means --no-build-isolation.
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        ["unshare", "-n", "--", sys.executable, "-m", "tests.integration.sky_moto_driver", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.monotonic() - t0
    leftovers = processes_tagged(str(work))
    for pid in leftovers:  # last resort, by process id
        os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "exception" not in result, result["exception"]
    result["leftovers"] = leftovers
    result["elapsed_seconds"] = round(elapsed, 1)
    print(f"skypilot+moto integration: {json.dumps(result, indent=1)}")
    return result


def test_region_without_internet_gateway_is_a_capacity_error(observed: dict) -> None:
    a = observed["a"]
    assert a["error"] == "CapacityError", a
    assert a["tried"] == [BAD_REGION]
    assert f"tried: {BAD_REGION}" in a["message"]
    assert a["instances_left"] == []


def test_every_render_passes_the_servers_validation_and_optimizer(observed: dict) -> None:
    assert observed["dry_runs"] == {
        name: "ok"
        for name in ["pip_labels", "image", "uv_disk_tier_spot", "weight_store", "private", "exec_pin"]
    }
    assert observed["dry_run_instances"] == 0  # a dry run provisions nothing


def test_pricing_from_the_catalog_on_real_resources(observed: dict) -> None:
    assert observed["price_g5_xlarge"] == 1.006
    [listed] = observed["b"]["listed"]  # the launched handle's resources, as list() builds refs
    assert listed["hourly_price"] == 1.006 and listed["accelerators"] == {"A10G": 1}


def test_calls_on_a_cluster_that_is_not_up_map_to_provider_errors(observed: dict) -> None:
    calls = observed["b"]["init_calls"]
    assert calls["probe"] == "None"
    assert (
        calls["heartbeat"]["error"] == "ProviderError"
        and "ClusterNotUpError" in calls["heartbeat"]["message"]
    )
    assert (
        calls["endpoint"]["error"] == "ProviderError" and "ClusterNotUpError" in calls["endpoint"]["message"]
    )
    assert calls["probe_loading"] == {"returned": "'dead'"}
    # exec waits for the lock the launch holds: the client's timeout ends it as ours.
    assert calls["swap"] == {"error": "SkyTimeout", "message": "SkyPilot exec did not finish within 5s"}


def test_failsafe_check_reads_the_servers_version_and_each_cluster(observed: dict) -> None:
    first, *clusters = observed["b"]["failsafe"]
    assert first.startswith("SkyPilot API server 0.14.1 (API version ")
    [cluster] = clusters
    assert "(INIT): no autodown until its launch ends" in cluster


def test_launch_creates_an_instance_tagged_with_our_labels(observed: dict) -> None:
    b = observed["b"]
    tags = b["tags"]
    assert tags["managed-by"] == "llm-gateway" and tags["llmgw-instance"] == "itest0000001"
    assert tags["llmgw-model"] == "org-tiny-model"
    assert tags["llmgw-priority"] == "1"
    assert tags["llmgw-deployment"] == "dep12345"
    [listed] = b["listed"]
    assert listed["name"].startswith("llmgw-org-tiny-model-")
    assert listed["status"] == "INIT"  # never UP: moto has no SSH
    assert listed["deployment_id"] == "dep12345"


def test_cancelled_launch_terminates_the_instance(observed: dict) -> None:
    c = observed["c"]
    assert c["state"] == "terminated"
    assert c["listed_after"] == []


def test_reconcile_downs_this_installations_clusters_and_no_one_elses(observed: dict) -> None:
    r = observed["reconcile"]
    assert r["listed"] == ["known001", "unkn0002"] and r["statuses"] == ["INIT", "INIT"]
    assert r["states"] == {"known001": "terminated", "unkn0002": "terminated", "stag0003": "running"}
    assert r["staging_listed"] == ["stag0003"]  # the staging gateway sees its own


def test_no_api_server_or_moto_is_left(observed: dict) -> None:
    assert observed["leftovers"] == []
    assert "api_stop_error" not in observed
