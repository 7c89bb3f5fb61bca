"""Render `tasks/vllm.yaml` into a `sky.Task` for one deployment.

Only `render_config` is pure (a dict); `render_task` hands it to the real
`sky.Task.from_yaml_config`, which validates it offline.

The engine is private (tasks/front.py): vLLM binds 127.0.0.1, nginx holds the one port callers
reach and checks the deployment's engine key, which rides in `secrets:` only. `network:
public` opens that port to the internet (SkyPilot's default for `ports:`), for a gateway outside
the cloud; `private` opens none, for a gateway inside the VPC or Kubernetes cluster that reaches
the node's internal address (set `aws.use_internal_ips: true` in SkyPilot's config).
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from tasks import front
from tasks.provider import LaunchSpec, engine_args, weights

MANAGED_BY = "llm-gateway"
LABEL_MANAGED_BY = "managed-by"
LABEL_INSTANCE = "llmgw-instance"
LABEL_MODEL = "llmgw-model"
LABEL_PRIORITY = "llmgw-priority"
LABEL_DEPLOYMENT = "llmgw-deployment"
FRONT_PORT = 8000  # nginx: the port the gateway reaches
VLLM_PORT = 8001  # vLLM, on the node's loopback
ENGINE_PORT = FRONT_PORT
KEY_SECRET = "LLMGW_ENGINE_KEY"
CACHE_MOUNT = "/llmgw-cache"  # the compile cache bucket, mounted on the node
# SkyPilot cluster names: [a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?; clouds cut long names, keep it short.
_SLUG_MAX = 30


@dataclass(frozen=True)
class SkyTaskConfig:
    default_accelerators: tuple[str, ...] = ("L4", "A10G", "L40S", "A100", "A100-80GB", "H100")
    disk_size_gb: int = 256
    use_spot: bool = False
    vllm_version: str = "0.32.0"
    image: str | None = None  # e.g. vllm/vllm-openai:v0.32.0 → image_id docker:...; no vLLM install
    infra: str | None = None  # e.g. aws, aws/us-east-1, k8s; None lets SkyPilot choose
    extra_labels: dict[str, str] = field(default_factory=dict)
    network: Literal["public", "private"] = "public"
    install: Literal["pip", "uv"] = "pip"  # how setup installs vLLM when there is no image
    disk_tier: str | None = None  # low, medium, high, ultra, best; None: SkyPilot's default
    # A bucket (s3://, gs://) mounted cached on the node for vLLM's compile cache (VLLM_CACHE_ROOT).
    cache_uri: str | None = None
    # After a swap, how long the new job waits for the old engine to release its ports and GPUs.
    release_wait_seconds: int = 180


def model_slug(model: str) -> str:
    """A label- and cluster-name-safe form of a model id: lowercase, `-` separated."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:_SLUG_MAX].strip("-")
    return slug or "model"


def cluster_name(spec: LaunchSpec) -> str:
    """`llmgw-<model-slug>-<short hash>`: valid for SkyPilot, stable per deployment."""
    digest = hashlib.sha256(f"{spec.model}\0{spec.deployment_id}".encode()).hexdigest()[:8]
    return f"llmgw-{model_slug(spec.model)}-{digest}"


def template() -> dict[str, Any]:
    text = resources.files("tasks").joinpath("vllm.yaml").read_text()
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def labels(spec: LaunchSpec, config: SkyTaskConfig) -> dict[str, str]:
    """The cluster's labels. SkyPilot fixes them when it provisions the cluster (`sky status`
    reads them from the handle's launched resources; an `exec` onto it cannot change them), so
    after a swap, and while a cluster is a spare, they still name the deployment it was launched
    for: the gateway's /admin/clusters says who holds it now."""
    return {
        **config.extra_labels,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_INSTANCE: spec.instance_id,
        LABEL_MODEL: model_slug(spec.model),
        LABEL_PRIORITY: str(spec.priority),
        LABEL_DEPLOYMENT: spec.deployment_id,
    }


def front_config() -> str:
    """The node's nginx.conf; the run script fills in the key, the directory and the ports."""
    return front.nginx_config(
        front.FrontConfig(listen="__LLMGW_LISTEN__", upstream="127.0.0.1:__LLMGW_VLLM_PORT__")
    )


def render_config(
    spec: LaunchSpec, config: SkyTaskConfig, *, accelerators: dict[str, int] | None = None
) -> dict[str, Any]:
    """The task as a YAML-shaped dict. `accelerators` pins an exact set (for `exec` on a
    running cluster); otherwise any of the model's (or the default) types, `spec.gpus` each."""
    if not spec.engine_key or not spec.instance_id:
        raise ValueError(f"deployment {spec.deployment_id}: an engine key and the instance id are required")
    task = copy.deepcopy(template())
    task["name"] = f"llmgw-{model_slug(spec.model)}"
    task["resources"] = _resources(spec, config, accelerators)
    task["envs"] = {**task.get("envs", {}), **_envs(spec, config)}
    task["secrets"] = {**spec.secrets, KEY_SECRET: spec.engine_key}
    if config.cache_uri:
        task["file_mounts"] = {CACHE_MOUNT: {"source": config.cache_uri, "mode": "MOUNT_CACHED"}}
    return task


def _resources(
    spec: LaunchSpec, config: SkyTaskConfig, accelerators: dict[str, int] | None
) -> dict[str, Any]:
    wanted = accelerators or {name: spec.gpus for name in (spec.accelerators or config.default_accelerators)}
    res: dict[str, Any] = {
        "accelerators": wanted,
        "disk_size": config.disk_size_gb,
        "use_spot": config.use_spot,
        "labels": labels(spec, config),
    }
    if config.network == "public":
        res["ports"] = FRONT_PORT
    if config.disk_tier:
        res["disk_tier"] = config.disk_tier
    if config.infra:
        res["infra"] = config.infra
    if config.image:
        res["image_id"] = f"docker:{config.image}"
    return res


def _envs(spec: LaunchSpec, config: SkyTaskConfig) -> dict[str, str]:
    envs = {
        "MODEL_ID": weights(spec),
        "SERVED_NAME": spec.model,
        "ENGINE_ARGS": shlex.join(engine_args(spec)),  # the streamer's with a weight store
        "VLLM_VERSION": config.vllm_version,
        "VLLM_INSTALL": "none" if config.image else config.install,
        "VLLM_EXTRAS": "runai" if spec.weights_uri else "",
        "VLLM_PORT": str(VLLM_PORT),
        "FRONT_PORT": str(FRONT_PORT),
        "FRONT_HOST": "0.0.0.0",
        "LLMGW_FRONT_CONF": front_config(),
        "LLMGW_RELEASE_WAIT_SECONDS": str(config.release_wait_seconds),
    }
    if config.cache_uri:
        envs["VLLM_CACHE_ROOT"] = f"{CACHE_MOUNT}/{model_slug(spec.model)}"
    return envs


def render_task(
    spec: LaunchSpec, config: SkyTaskConfig, *, accelerators: dict[str, int] | None = None
) -> Any:
    """A validated `sky.Task` (imports SkyPilot on first use)."""
    import sky

    return sky.Task.from_yaml_config(render_config(spec, config, accelerators=accelerators))
