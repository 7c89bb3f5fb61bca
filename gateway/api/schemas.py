"""JSON shapes of the admin API (plain functions, no routing)."""

from __future__ import annotations

from typing import Any

from gateway.config.reference import Catalog, ModelSpec
from gateway.config.settings import Settings
from gateway.control.controller import Controller
from state import Event, Store
from tasks.provider import ClusterInfo


def model_status(spec: ModelSpec, catalog: Catalog, controller: Controller, store: Store) -> dict[str, Any]:
    live = controller.live(spec.id)
    route = controller.routes.get(spec.id)
    failure = controller.failure(spec.id)
    reference = catalog.reference.get(spec.id)
    last_used = controller.activity.last_used(spec.id)
    return {
        "id": spec.id,
        "state": "external" if spec.external else controller.phase(spec.id),
        "priority": spec.priority,
        "reference_priority": reference.priority if reference else 0,
        "keep_hot_seconds": spec.keep_hot_seconds
        if spec.keep_hot_seconds is not None
        else controller.settings.keep_hot_seconds,
        "gpus_per_replica": spec.gpus_per_replica,
        "kind": spec.kind,
        "external": spec.external,
        "in_flight": controller.activity.in_flight(spec.id),
        "waiting": controller.waiting(spec.id),
        "deployment_id": live.deployment_id if live else None,
        "endpoint": route.base_url if route else spec.endpoint,
        "last_used_at": last_used.isoformat() if last_used else None,
        "failure": failure.error if failure else None,
    }


def settings_view(settings: Settings) -> dict[str, Any]:
    """Settings as JSON, secrets masked (SecretStr dumps as '**********')."""
    return settings.model_dump(mode="json")


def cluster_rows(infos: list[ClusterInfo]) -> list[dict[str, Any]]:
    return [
        {
            "name": i.ref.name,
            "status": i.status,
            "deployment_id": i.ref.deployment_id or None,
            "model": i.model or i.ref.data.get("model") or i.ref.data.get("model_slug"),
        }
        for i in infos
    ]


def event_rows(events: list[Event]) -> list[dict[str, Any]]:
    return [
        {
            "at": e.at.isoformat(),
            "kind": e.kind,
            "model": e.model,
            "deployment_id": e.deployment_id,
            "message": e.message,
        }
        for e in events
    ]
