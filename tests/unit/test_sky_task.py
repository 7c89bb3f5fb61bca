"""The SkyPilot task template, rendered and validated by the real `sky.Task.from_yaml_config`."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tasks.provider import LaunchSpec
from tasks.sky_task import SkyTaskConfig, cluster_name, model_slug, render_task

SKY_NAME = re.compile(r"^[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?$")


def spec(gpus: int = 1, **kw) -> LaunchSpec:
    values = {
        "deployment_id": "abc123",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "gpus": gpus,
        "priority": 1,
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
        assert r.ports == ["8000"]
        assert r.labels == {
            "managed-by": "llm-gateway",
            "llmgw-model": "meta-llama-llama-3-1-8b-instru",
            "llmgw-priority": "1",
            "llmgw-deployment": "abc123",
        }
        assert r.disk_size == 256 and not r.use_spot
    assert task.num_nodes == 1
    assert task.envs["MODEL_ID"] == task.envs["SERVED_NAME"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "--tensor-parallel-size" in task.run and "SKYPILOT_NUM_GPUS_PER_NODE" in task.run
    assert (
        'pip install --quiet "vllm==${VLLM_VERSION}"' in task.setup and task.envs["VLLM_VERSION"] == "0.32.0"
    )


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


def test_gated_model_token_is_a_secret_not_an_env() -> None:
    token = "hf_supersecret_token_123"
    task = render_task(spec(secrets={"HF_TOKEN": token}), SkyTaskConfig())
    assert task.secrets["HF_TOKEN"].get_secret_value() == token
    assert "HF_TOKEN" not in task.envs and token not in str(task.envs)
    assert token not in repr(task) and token not in str(task)


def test_model_accelerators_image_spot_and_infra() -> None:
    config = SkyTaskConfig(
        image="vllm/vllm-openai:v0.32.0",
        use_spot=True,
        infra="aws/us-east-1",
        disk_size_gb=512,
        extra_labels={"team": "nlp"},
    )
    task = render_task(spec(2, accelerators=("L4",)), config)
    [r] = list(task.resources)
    assert r.accelerators == {"L4": 2} and r.use_spot and r.disk_size == 512
    assert r.image_id == {"us-east-1": "docker:vllm/vllm-openai:v0.32.0"}
    assert str(r.cloud).lower() == "aws" and r.region == "us-east-1"
    assert r.labels["team"] == "nlp" and r.labels["managed-by"] == "llm-gateway"
    assert task.setup is None  # the image has vLLM


def test_exact_accelerators_for_exec_on_a_running_cluster() -> None:
    task = render_task(spec(1), SkyTaskConfig(), accelerators={"A10G": 4})
    assert [r.accelerators for r in task.resources] == [{"A10G": 4}]


def test_local_weights_path_is_loaded_but_served_as_the_id() -> None:
    task = render_task(spec(model_path="/mnt/weights/llama"), SkyTaskConfig())
    assert task.envs["MODEL_ID"] == "/mnt/weights/llama"
    assert task.envs["SERVED_NAME"] == "meta-llama/Llama-3.1-8B-Instruct"


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
