"""Render `tasks/vllm.yaml` into a `sky.Task` for one deployment.

Only `render_config` is pure (a dict); `render_task` hands it to the real
`sky.Task.from_yaml_config`, which validates it offline.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from tasks.provider import LaunchSpec

MANAGED_BY = "llm-gateway"
LABEL_MANAGED_BY = "managed-by"
LABEL_MODEL = "llmgw-model"
LABEL_PRIORITY = "llmgw-priority"
LABEL_DEPLOYMENT = "llmgw-deployment"
ENGINE_PORT = 8000
# SkyPilot cluster names: [a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?; clouds cut long names, keep it short.
_SLUG_MAX = 30


@dataclass(frozen=True)
class SkyTaskConfig:
    default_accelerators: tuple[str, ...] = ("L4", "A10G", "L40S", "A100", "A100-80GB", "H100")
    disk_size_gb: int = 256
    use_spot: bool = False
    vllm_version: str = "0.32.0"
    image: str | None = None  # e.g. vllm/vllm-openai:v0.32.0 → image_id docker:...; no pip setup
    infra: str | None = None  # e.g. aws, aws/us-east-1, k8s; None lets SkyPilot choose
    extra_labels: dict[str, str] = field(default_factory=dict)


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
    return {
        **config.extra_labels,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_MODEL: model_slug(spec.model),
        LABEL_PRIORITY: str(spec.priority),
        LABEL_DEPLOYMENT: spec.deployment_id,
    }


def render_config(
    spec: LaunchSpec, config: SkyTaskConfig, *, accelerators: dict[str, int] | None = None
) -> dict[str, Any]:
    """The task as a YAML-shaped dict. `accelerators` pins an exact set (for `exec` on a
    running cluster); otherwise any of the model's (or the default) types, `spec.gpus` each."""
    task = copy.deepcopy(template())
    wanted = accelerators or {name: spec.gpus for name in (spec.accelerators or config.default_accelerators)}
    res: dict[str, Any] = task.setdefault("resources", {})
    res.update(
        {
            "accelerators": wanted,
            "ports": ENGINE_PORT,
            "disk_size": config.disk_size_gb,
            "use_spot": config.use_spot,
            "labels": labels(spec, config),
        }
    )
    if config.infra:
        res["infra"] = config.infra
    if config.image:
        res["image_id"] = f"docker:{config.image}"
        task.pop("setup", None)  # the image has vLLM
    task["name"] = f"llmgw-{model_slug(spec.model)}"
    task["envs"] = {
        **task.get("envs", {}),
        "MODEL_ID": spec.model_path or spec.model,
        "SERVED_NAME": spec.model,
        "ENGINE_ARGS": shlex.join(spec.engine_args),
        "VLLM_VERSION": config.vllm_version,
        "VLLM_PORT": str(ENGINE_PORT),
    }
    if spec.secrets:
        task["secrets"] = dict(spec.secrets)
    return task


def render_task(
    spec: LaunchSpec, config: SkyTaskConfig, *, accelerators: dict[str, int] | None = None
) -> Any:
    """A validated `sky.Task` (imports SkyPilot on first use)."""
    import sky

    return sky.Task.from_yaml_config(render_config(spec, config, accelerators=accelerators))
