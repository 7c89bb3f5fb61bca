"""The SkyPilot task template, rendered and validated by the real `sky.Task.from_yaml_config`;
its run script run here, with real nginx in front of a stub engine."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tasks.procs import group_members
from tasks.provider import LaunchSpec
from tasks.sky_task import SkyTaskConfig, cluster_name, model_slug, render_config, render_task
from tests.stub_upstream import free_port

SKY_NAME = re.compile(r"^[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?$")
KEY = "0123456789abcdef" * 4
STUB = Path(__file__).parents[1] / "stub_upstream.py"


def spec(gpus: int = 1, **kw: Any) -> LaunchSpec:
    values: dict[str, Any] = {
        "deployment_id": "abc123",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "gpus": gpus,
        "priority": 1,
        "engine_key": KEY,
        "instance_id": "inst0123abcd",
    }
    values.update(kw)
    return LaunchSpec(**values)


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_render_validates_for_1_2_8_gpus(gpus: int) -> None:
    config = SkyTaskConfig(default_accelerators=("A100", "H100"))
    task = render_task(spec(gpus, engine_args=("--max-model-len", "4096")), config)
    resources = list(task.resources)
    assert sorted(name for r in resources for name in r.accelerators) == ["A100", "H100"]  # any of
    assert all(list(r.accelerators.values()) == [gpus] for r in resources)
    for r in resources:
        assert r.ports == ["8000"]  # the front's port; vLLM's own (8001) stays on loopback
        assert r.labels == {
            "managed-by": "llm-gateway",
            "llmgw-instance": "inst0123abcd",
            "llmgw-model": "meta-llama-llama-3-1-8b-instru",
            "llmgw-priority": "1",
            "llmgw-deployment": "abc123",
        }
        assert r.disk_size == 256 and not r.use_spot
    assert task.num_nodes == 1
    assert task.envs["MODEL_ID"] == task.envs["SERVED_NAME"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "--tensor-parallel-size" in task.run and "SKYPILOT_NUM_GPUS_PER_NODE" in task.run
    assert task.envs["VLLM_INSTALL"] == "pip" and task.envs["VLLM_VERSION"] == "0.32.0"
    assert '"$want"' in task.setup and "apt-get install -y -qq nginx" in task.setup


def test_vllm_binds_loopback_and_the_key_is_only_a_secret() -> None:
    task = render_task(spec(secrets={"HF_TOKEN": "hf_tok"}), SkyTaskConfig())
    assert '--host 127.0.0.1 --port "${VLLM_PORT}"' in task.run and "0.0.0.0" not in task.run
    assert task.envs["VLLM_PORT"] == "8001" and task.envs["FRONT_PORT"] == "8000"
    assert task.secrets["LLMGW_ENGINE_KEY"].get_secret_value() == KEY
    assert task.secrets["HF_TOKEN"].get_secret_value() == "hf_tok"
    assert KEY not in str(task.envs) and KEY not in task.run and KEY not in (task.setup or "")
    assert KEY not in repr(task) and KEY not in str(task) and "hf_tok" not in repr(task)
    conf = task.envs["LLMGW_FRONT_CONF"]
    assert "listen __LLMGW_LISTEN__;" in conf and "server 127.0.0.1:__LLMGW_VLLM_PORT__;" in conf
    assert "__LLMGW_ENGINE_KEY__" in conf and task.envs["FRONT_HOST"] == "0.0.0.0"


def test_engine_args_survive_the_shell() -> None:
    args = ("--chat-template", "{{ x }} 'quoted' $HOME", "--max-model-len", "8192")
    task = render_task(spec(engine_args=args), SkyTaskConfig())
    out = subprocess.run(
        ["bash", "-c", 'eval "set -- ${ENGINE_ARGS}"; printf "%s\\n" "$@"'],
        env={**os.environ, "ENGINE_ARGS": task.envs["ENGINE_ARGS"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert tuple(out.splitlines()) == args


def test_model_accelerators_image_spot_infra_and_disk_tier() -> None:
    config = SkyTaskConfig(
        image="vllm/vllm-openai:v0.32.0",
        use_spot=True,
        infra="aws/us-east-1",
        disk_size_gb=512,
        disk_tier="high",
        extra_labels={"team": "nlp"},
    )
    task = render_task(spec(2, accelerators=("L4",)), config)
    [r] = list(task.resources)
    assert r.accelerators == {"L4": 2} and r.use_spot and r.disk_size == 512
    assert r.disk_tier.value == "high"
    assert r.image_id == {"us-east-1": "docker:vllm/vllm-openai:v0.32.0"}
    assert str(r.cloud).lower() == "aws" and r.region == "us-east-1"
    assert r.labels["team"] == "nlp" and r.labels["managed-by"] == "llm-gateway"
    assert task.envs["VLLM_INSTALL"] == "none"  # the image has vLLM; setup only adds nginx


def test_private_network_opens_no_port() -> None:
    task = render_task(spec(), SkyTaskConfig(network="private"))
    [r] = [res for res in task.resources if "L4" in res.accelerators]
    assert not r.ports


def test_weight_store_streams_and_the_compile_cache_is_a_cached_mount() -> None:
    config = SkyTaskConfig(cache_uri="s3://llmgw-cache")
    task = render_task(spec(weights_uri="s3://llmgw-weights/meta-llama/Llama-3.1-8B-Instruct"), config)
    assert task.envs["MODEL_ID"] == "s3://llmgw-weights/meta-llama/Llama-3.1-8B-Instruct"
    assert task.envs["ENGINE_ARGS"].endswith("--load-format runai_streamer")
    assert task.envs["VLLM_EXTRAS"] == "runai"
    assert task.envs["VLLM_CACHE_ROOT"] == "/llmgw-cache/meta-llama-llama-3-1-8b-instru"
    [(path, storage)] = task.storage_mounts.items()
    assert path == "/llmgw-cache" and storage.source == "s3://llmgw-cache"
    assert storage.mode.value == "MOUNT_CACHED"


def test_uv_setup_when_asked() -> None:
    task = render_task(spec(), SkyTaskConfig(install="uv"))
    assert task.envs["VLLM_INSTALL"] == "uv" and "uv pip install" in task.setup


def test_exact_accelerators_for_exec_on_a_running_cluster() -> None:
    task = render_task(spec(1), SkyTaskConfig(), accelerators={"A10G": 1})
    assert [r.accelerators for r in task.resources] == [{"A10G": 1}]


def test_local_weights_path_is_loaded_but_served_as_the_id() -> None:
    task = render_task(spec(model_path="/mnt/weights/llama"), SkyTaskConfig())
    assert task.envs["MODEL_ID"] == "/mnt/weights/llama"
    assert task.envs["SERVED_NAME"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_no_render_without_a_key_or_an_instance() -> None:
    with pytest.raises(ValueError, match="engine key and the instance id"):
        render_config(spec(engine_key=""), SkyTaskConfig())
    with pytest.raises(ValueError, match="engine key and the instance id"):
        render_config(spec(instance_id=""), SkyTaskConfig())


def test_cluster_names_are_valid_stable_and_distinct() -> None:
    names = {
        cluster_name(spec(model=m, deployment_id=d))
        for m in ["org/Model_v2.5", "x", "A" * 200, "org/ünïcode-ish", "9starts-with-digit"]
        for d in ["d1", "d2"]
    }
    assert len(names) == 10
    for name in names:
        assert SKY_NAME.match(name) and name.startswith("llmgw-") and len(name) <= 45, name
    assert cluster_name(spec()) == cluster_name(spec())
    assert model_slug("Org/Model_V2.5") == "org-model-v2-5"


# -- the run script, run here: nginx from this machine, a stub in vLLM's place ---------------

SHIM = """#!{python}
# `vllm serve MODEL --served-model-name NAME --host H --port P --tensor-parallel-size N ...`
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("serve"); p.add_argument("model"); p.add_argument("--served-model-name")
p.add_argument("--host"); p.add_argument("--port"); p.add_argument("--tensor-parallel-size")
a, _ = p.parse_known_args()
assert a.host == "127.0.0.1", a.host
print("vllm shim: tp", a.tensor_parallel_size, flush=True)
os.execv(sys.executable, [sys.executable, {stub!r}, "--port", a.port, "--served-name", a.served_model_name])
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Any]:
    """Run the rendered task's run script as SkyPilot would: envs and secrets in the
    environment, `bash -c run`, in its own process group."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vllm"
    shim.write_text(SHIM.format(python=sys.executable, stub=str(STUB)))
    shim.chmod(0o755)
    started: list[subprocess.Popen[bytes]] = []

    def run(front_port: int, vllm_port: int, release_wait: int = 30) -> subprocess.Popen[bytes]:
        task = yaml.safe_load(yaml.safe_dump(render_config(spec(model="org/m"), SkyTaskConfig())))
        env = {
            **task["envs"],
            **task["secrets"],
            "FRONT_PORT": str(front_port),
            "FRONT_HOST": "127.0.0.1",
            "VLLM_PORT": str(vllm_port),
            "LLMGW_RELEASE_WAIT_SECONDS": str(release_wait),
            "SKYPILOT_NUM_GPUS_PER_NODE": "1",
            "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/bin",
            "HOME": str(tmp_path),
        }
        log = (tmp_path / "job.log").open("ab")
        proc = subprocess.Popen(
            ["bash", "-c", task["run"]], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGTERM)  # the script's trap removes its front directory
        try:
            proc.wait(10)
        finally:
            if group_members(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)


def wait_health(base: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(base)


def test_the_run_script_serves_the_engine_behind_the_front_only(node: Any) -> None:
    front_port, vllm_port = free_port(), free_port()
    job = node(front_port, vllm_port)
    base = f"http://127.0.0.1:{front_port}"
    wait_health(base)
    body = {"model": "org/m", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 401
    assert (
        httpx.post(f"{base}/invocations", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 403
    )
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["model"] == "org/m"
    for pid in group_members(job.pid):  # the key is in no process's arguments
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    front_dirs = [p for p in Path("/tmp").glob("llmgw-front-*") if (p / "nginx.conf").exists()]
    assert any(KEY in (p / "nginx.conf").read_text() for p in front_dirs)
    os.killpg(job.pid, signal.SIGTERM)  # what SkyPilot's cancel does
    assert job.wait(10) != 0
    deadline = time.monotonic() + 10
    while group_members(job.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(job.pid) == []
    assert not any(p.exists() for p in front_dirs)  # the config with the key is gone


def test_the_run_script_waits_until_the_old_engine_let_go_of_its_port(node: Any) -> None:
    front_port, vllm_port = free_port(), free_port()
    old = socket.socket()  # the cancelled engine, still holding the front's port
    old.bind(("127.0.0.1", front_port))
    old.listen()
    node(front_port, vllm_port)
    time.sleep(2)
    with pytest.raises(TimeoutError):
        wait_health(f"http://127.0.0.1:{front_port}", timeout=0.5)  # the old one answers nothing
    old.close()
    wait_health(f"http://127.0.0.1:{front_port}")


def test_the_job_ends_when_the_engine_ends(node: Any, tmp_path: Path) -> None:
    front_port, vllm_port = free_port(), free_port()
    job = node(front_port, vllm_port)
    wait_health(f"http://127.0.0.1:{front_port}")
    engine = next(
        pid for pid in group_members(job.pid) if b"stub_upstream" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    os.kill(engine, signal.SIGKILL)
    assert job.wait(10) != 0  # the job fails (SkyPilot sees FAILED), and nginx is gone with it
    deadline = time.monotonic() + 10
    while group_members(job.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(job.pid) == []
    assert "vllm shim: tp 1" in (tmp_path / "job.log").read_text()
