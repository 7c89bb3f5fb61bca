"""SkyPilotProvider through a real SkyPilot API server against a moto EC2, offline.

Everything runs in a network namespace with loopback only (`unshare -n`, needs root, as in CI):
moto on 127.0.0.1, a real `sky api start`, real launches that create EC2 instances in moto.
The instance never reaches UP (there is no SSH), so the launch is cancelled once it exists.
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


def test_launch_creates_an_instance_tagged_with_our_labels(observed: dict) -> None:
    b = observed["b"]
    tags = b["tags"]
    assert tags["managed-by"] == "llm-gateway"
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


def test_no_api_server_or_moto_is_left(observed: dict) -> None:
    assert observed["leftovers"] == []
    assert "api_stop_error" not in observed
