"""Small value objects shared by the controller, the reconcile step and the admin API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from gateway.config.reference import ModelSpec
from state import DeploymentState
from tasks.provider import ClusterRef


@dataclass(frozen=True)
class Route:
    model: str
    base_url: str
    deployment_id: str | None = None  # None for external endpoints


@dataclass
class LiveDeployment:
    """In-memory mirror of one live deployment (the store has the same, durably)."""

    deployment_id: str
    spec: ModelSpec
    state: DeploymentState
    ref: ClusterRef | None = None
    ready_at: datetime | None = None


@dataclass(frozen=True)
class Failure:
    """A model whose engine failed to start (for a reason other than capacity)."""

    model: str
    error: str
    at: datetime


def ref_json(ref: ClusterRef) -> str:
    return json.dumps(
        {
            "provider": ref.provider,
            "name": ref.name,
            "deployment_id": ref.deployment_id,
            "gpus": ref.gpus,
            "data": dict(ref.data),
        }
    )


def ref_from_json(raw: str | None) -> ClusterRef | None:
    if not raw:
        return None
    d = json.loads(raw)
    return ClusterRef(
        provider=d["provider"],
        name=d["name"],
        deployment_id=d["deployment_id"],
        gpus=d["gpus"],
        data=d["data"],
    )
