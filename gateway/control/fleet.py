"""Value objects shared by the controller, its runners, the reconcile step and the admin API."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from tasks.provider import ClusterRef


@dataclass(frozen=True)
class Route:
    model: str
    base_url: str
    deployment_id: str | None = None  # None for external endpoints
    # Sent upstream as `Authorization: Bearer …`: the engine's own key (never the client's).
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Failure:
    """A model whose engine failed to start (for a reason other than capacity). `error` is for
    admins (it may quote the engine's log); clients are told only that it failed, and where."""

    model: str
    error: str
    at: datetime
    deployment_id: str | None = None


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
