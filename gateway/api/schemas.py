"""Response models of the admin API and of /health and /v1/models, and the functions that fill
them from the controller (no routing here). Field examples are what Swagger shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

from gateway.config.reference import Catalog, ModelSpec
from gateway.config.settings import Settings
from gateway.control.controller import Controller
from gateway.control.fleet import Failure
from state import Event
from tasks.provider import ClusterInfo

MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
AT = "2026-11-27T10:00:00+00:00"


def _as_utc(at: datetime) -> datetime:
    """A time without a zone is UTC."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# A time given in a query parameter: ISO 8601 (a date alone is its midnight); no zone means UTC.
QueryTime = Annotated[datetime, AfterValidator(_as_utc)]

# A time in an answer: ISO 8601 with its offset, as `datetime.isoformat()` writes it.
Time = Annotated[
    datetime,
    PlainSerializer(lambda at: at.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaOut(Out):
    deployment_id: str = Field(examples=["3f2a9c1b7e4d"])
    state: str = Field(examples=["ready"])
    endpoint: str | None = Field(examples=["http://10.0.0.5:8000"])
    in_flight: int = Field(examples=[2])
    requests: int = Field(description="Requests sent to this replica by this gateway.", examples=[120])


class ModelStatus(Out):
    id: str = Field(examples=[MODEL_ID])
    state: str = Field(
        description="`stopped`, `pending` ... `ready`, `spare` (its cluster kept for another cold start), "
        "or `external`.",
        examples=["ready"],
    )
    priority: int = Field(description="Effective priority (admin override or file).", examples=[1])
    reference_priority: int = Field(description="The reference file's priority.", examples=[0])
    keep_hot_seconds: float = Field(examples=[600])
    spare_seconds: float = Field(
        description="How long its cluster stays up as a spare after the keep-hot time (0: off).", examples=[0]
    )
    spare_until: Time | None = Field(
        None, description="While its cluster is a spare: when it is stopped unless claimed.", examples=[None]
    )
    gpus_per_replica: int = Field(examples=[1])
    kind: str = Field(examples=["chat"])
    external: bool = Field(description="Served by an endpoint the gateway does not run.", examples=[False])
    in_flight: int = Field(examples=[2])
    waiting: int = Field(description="Requests waiting for the engine to start.", examples=[0])
    deployment_id: str | None = Field(examples=["3f2a9c1b7e4d"])
    endpoint: str | None = Field(examples=["http://10.0.0.5:8000"])
    last_used_at: Time | None = Field(examples=[AT])
    failure: str | None = Field(description="Why its last start failed, while remembered.", examples=[None])
    replicas_min: int = Field(description="Replicas kept while the model is hot.", examples=[0])
    replicas_max: int = Field(description="Replicas it may scale up to under load.", examples=[1])
    replicas: list[ReplicaOut] = Field(description="Its live deployments, oldest first.", examples=[[]])


class ModelUpdate(BaseModel):
    """Fields to override; a field given as null goes back to the reference file's value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"priority": 2}]})

    priority: int | None = Field(None, ge=0, le=100)
    keep_hot_seconds: float | None = Field(None, ge=0)


class LoadOut(Out):
    model: str = Field(examples=[MODEL_ID])
    state: str = Field(examples=["ready"])


class UnloadOut(Out):
    model: str = Field(examples=[MODEL_ID])
    stopped: bool = Field(description="False if nothing was running or starting.", examples=[True])


class InfoOut(Out):
    version: str = Field(examples=["0.1.0"])
    provider: str = Field(examples=["local"])
    models: int = Field(description="Models in the reference file.", examples=[3])
    gpus_in_use: int = Field(examples=[1])
    deployments: dict[str, int] = Field(description="Live deployments by state.", examples=[{"ready": 1}])
    failures: int = Field(description="Models with a remembered start failure.", examples=[0])
    settings: dict[str, Any] = Field(description="The settings, secrets masked.", examples=[{"port": 8000}])


class ClusterOut(Out):
    name: str = Field(examples=["llmgw-tiny-llama-1a2b3c4d"])
    status: str = Field(examples=["UP"])
    deployment_id: str | None = Field(
        description="The deployment it was launched for (its label).", examples=["3f2a9c1b7e4d"]
    )
    model: str | None = Field(examples=["tiny-llama"])
    held_by: str | None = Field(
        None,
        description="The deployment holding it now (after a takeover or a spare swap, not the one it was "
        "launched for); null: none of this gateway's.",
        examples=["3f2a9c1b7e4d"],
    )
    state: str | None = Field(
        None,
        description="That deployment's state: `ready`, `spare` (kept for a cold start), ...",
        examples=["spare"],
    )


class EventOut(Out):
    at: Time = Field(examples=[AT])
    kind: str = Field(examples=["idle-stop"])
    model: str | None = Field(examples=["tiny-llama"])
    deployment_id: str | None = Field(examples=["3f2a9c1b7e4d"])
    message: str = Field(examples=["idle 601s > keep_hot_seconds 600"])


class CostRow(Out):
    """One group of `/admin/costs`: the group's key is the one field of model, day, cluster,
    phase, key and team that is present (the `group_by` asked for)."""

    model: str | None = Field(None, examples=["tiny-llama"])
    day: str | None = Field(None, description="UTC day, YYYY-MM-DD.", examples=["2026-11-27"])
    cluster: str | None = Field(None, examples=["llmgw-tiny-llama-1a2b3c4d"])
    phase: str | None = Field(None, examples=["serving"])
    key: str | None = Field(
        None, description="Client API key id, `admin` or `-`.", examples=["key-3f2a9c1b7e4d"]
    )
    team: str | None = Field(None, description="The keys' team label.", examples=["search"])
    dollars: float = Field(examples=[1.25])
    gpu_hours: float = Field(examples=[1.25])
    cold_dollars: float = Field(description="Launching and loading.", examples=[0.1])
    serving_dollars: float = Field(examples=[0.9])
    idle_dollars: float = Field(description="Kept hot without traffic.", examples=[0.25])
    spare_dollars: float = Field(
        description="Clusters kept up as spares after their keep-hot time.", examples=[0.05]
    )
    failed_dollars: float = Field(description="Launches that never became ready.", examples=[0.0])


class FailureOut(Out):
    model: str = Field(examples=["org/broken"])
    error: str = Field(examples=["engine exited (code 1)"])
    at: Time = Field(examples=[AT])


class ResetOut(Out):
    reset: list[str] = Field(description="Models whose failure was forgotten.", examples=[["org/broken"]])


class ReloadOut(Out):
    models: int = Field(examples=[3])
    added: list[str] = Field(examples=[["org/new"]])
    removed: list[str] = Field(examples=[[]])


class ResetAllOut(Out):
    stopped: list[str] = Field(
        description="Models whose engine or start was stopped.", examples=[["tiny-llama"]]
    )
    failures_reset: list[str] = Field(examples=[[]])


class HealthOut(Out):
    status: Literal["ok"] = "ok"


class ModelEntry(Out):
    id: str = Field(examples=["tiny-llama"])
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llm-gateway"
    state: str = Field(examples=["stopped"])
    priority: int = Field(examples=[0])
    gpus_per_replica: int = Field(examples=[1])
    kind: str = Field(examples=["chat"])


class ModelList(Out):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


# -- filling them ------------------------------------------------------------------------------


def model_status(spec: ModelSpec, catalog: Catalog, controller: Controller) -> ModelStatus:
    live = controller.live(spec.id)
    route = controller.routes.get(spec.id)
    failure = controller.failure(spec.id)
    reference = catalog.reference.get(spec.id)
    keep_hot = spec.keep_hot_seconds
    spare = spec.spare_seconds if spec.spare_seconds is not None else controller.settings.spare_seconds
    spare_at = live.spare_at if live is not None and live.state.value == "spare" else None
    return ModelStatus(
        id=spec.id,
        state="external" if spec.external else controller.phase(spec.id),
        priority=spec.priority,
        reference_priority=reference.priority if reference else 0,
        keep_hot_seconds=keep_hot if keep_hot is not None else controller.settings.keep_hot_seconds,
        spare_seconds=spare,
        spare_until=spare_at + timedelta(seconds=spare) if spare_at is not None else None,
        gpus_per_replica=spec.gpus_per_replica,
        kind=spec.kind,
        external=spec.external,
        in_flight=controller.activity.in_flight(spec.id),
        waiting=controller.waiting(spec.id),
        deployment_id=live.deployment_id if live else None,
        endpoint=route.base_url if route else spec.endpoint,
        last_used_at=controller.activity.last_used(spec.id),
        failure=failure.error if failure else None,
        replicas_min=spec.replicas.min,
        replicas_max=spec.replicas.max,
        replicas=[
            ReplicaOut(
                deployment_id=r.id,
                state=r.state.value,
                endpoint=r.endpoint.base_url if r.endpoint else None,
                in_flight=controller.activity.in_flight_of(r.id),
                requests=controller.activity.served_by(r.id),
            )
            for r in controller.runners(spec.id)
        ],
    )


def model_entry(spec: ModelSpec, controller: Controller) -> ModelEntry:
    return ModelEntry(
        id=spec.id,
        state="external" if spec.external else controller.phase(spec.id),
        priority=spec.priority,
        gpus_per_replica=spec.gpus_per_replica,
        kind=spec.kind,
    )


def settings_view(settings: Settings) -> dict[str, Any]:
    """Settings as JSON, secrets masked (SecretStr dumps as '**********')."""
    return settings.model_dump(mode="json")


def cluster_rows(infos: list[ClusterInfo], controller: Controller) -> list[ClusterOut]:
    holders = {r.ref.name: r for r in controller.runners() if r.ref is not None and not r.done}
    rows = []
    for i in infos:
        holder = holders.get(i.ref.name)
        rows.append(
            ClusterOut(
                name=i.ref.name,
                status=i.status,
                deployment_id=i.ref.deployment_id or None,
                model=i.model or i.ref.data.get("model") or i.ref.data.get("model_slug"),
                held_by=holder.id if holder else None,
                state=holder.state.value if holder else None,
            )
        )
    return rows


def event_rows(events: list[Event]) -> list[EventOut]:
    return [
        EventOut(at=e.at, kind=e.kind, model=e.model, deployment_id=e.deployment_id, message=e.message)
        for e in events
    ]


def failure_rows(failures: list[Failure]) -> list[FailureOut]:
    return [FailureOut(model=f.model, error=f.error, at=f.at) for f in failures]
