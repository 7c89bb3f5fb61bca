"""The admin API under /admin, behind a bearer token (Swagger's Authorize button works).

Model ids contain `/`, so model path parameters use the `path` converter:
`/admin/models/meta-llama/Llama-3.1-8B-Instruct/load`.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from gateway import __version__
from gateway.accounting.costs import GroupBy, columns, spans_of, summarize, to_csv
from gateway.api.errors import GatewayError, error_doc, model_not_found
from gateway.api.schemas import cluster_rows, event_rows, model_status, settings_view
from gateway.config.reference import Catalog, ModelSpec, ReferenceError, load_reference
from gateway.config.settings import Settings
from gateway.control.controller import Controller
from state import Store


def _aware(at: datetime | None) -> datetime | None:
    """Query times without a zone are UTC."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


bearer = HTTPBearer(auto_error=False, description="The gateway's `admin_token`.")


def _ex(example: Any) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {"application/json": {"example": example}}}}


MODEL_EXAMPLE = {
    "id": "meta-llama/Llama-3.1-8B-Instruct",
    "state": "ready",
    "priority": 1,
    "reference_priority": 0,
    "keep_hot_seconds": 600,
    "gpus_per_replica": 1,
    "kind": "chat",
    "external": False,
    "in_flight": 2,
    "waiting": 0,
    "deployment_id": "3f2a9c1b7e4d",
    "endpoint": "http://10.0.0.5:8000",
    "last_used_at": "2026-11-27T10:00:00Z",
    "failure": None,
}


class ModelUpdate(BaseModel):
    """Fields to override; a field given as null goes back to the reference file's value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"priority": 2}]})

    priority: int | None = Field(None, ge=0, le=100)
    keep_hot_seconds: float | None = Field(None, ge=0)


def admin_router(*, settings: Settings, catalog: Catalog, controller: Controller, store: Store) -> APIRouter:
    token = settings.admin_token
    if token is None:
        raise ValueError("admin_token is required (use `llm-gateway serve --dev` to generate one)")
    expected = token.get_secret_value().encode()

    def require_admin(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        given = creds.credentials.encode() if creds is not None else b""
        if creds is None or not secrets.compare_digest(given, expected):
            raise GatewayError(
                401,
                "A valid admin bearer token is required.",
                type="authentication_error",
                code="invalid_admin_token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    router = APIRouter(
        prefix="/admin",
        tags=["Admin"],
        dependencies=[Depends(require_admin)],
        responses={
            400: error_doc("Invalid parameters or body"),
            401: error_doc("Missing or wrong bearer token"),
            404: error_doc("Unknown model"),
            502: error_doc("The engine failed to start (load with wait)"),
            503: error_doc("No capacity, or the start timed out (load with wait)"),
        },
    )

    def spec_of(model_id: str) -> ModelSpec:
        spec = catalog.resolve(model_id)
        if spec is None:
            raise model_not_found(model_id)
        return spec

    def status(spec: ModelSpec) -> dict[str, Any]:
        return model_status(spec, catalog, controller, store)

    @router.get(
        "/models",
        summary="List models",
        description="Every model of the reference file with its state, effective priority and load.",
        responses=_ex([MODEL_EXAMPLE]),
    )
    async def list_models() -> list[dict[str, Any]]:
        return [status(spec) for spec in catalog.specs.values()]

    @router.get(
        "/models/{model_id:path}",
        summary="One model",
        description="State and settings of one model.",
        responses=_ex(MODEL_EXAMPLE),
    )
    async def get_model(model_id: str) -> dict[str, Any]:
        return status(spec_of(model_id))

    @router.patch(
        "/models/{model_id:path}",
        summary="Change priority or keep-hot time",
        description="Override `priority` and/or `keep_hot_seconds` (kept across restarts and "
        "reloads); give a field as null to return to the reference file's value. Applies to a "
        "running engine at once.",
        responses=_ex(MODEL_EXAMPLE),
    )
    async def update_model(model_id: str, update: ModelUpdate) -> dict[str, Any]:
        spec = spec_of(model_id)
        changes = {k: getattr(update, k) for k in update.model_fields_set}
        if not changes:
            raise GatewayError(400, "Give `priority` and/or `keep_hot_seconds`.", code="invalid_request")
        catalog.set_override(spec.id, **changes)
        current = catalog.overrides.get(spec.id, {})
        effective = catalog.specs.get(spec.id) or spec
        store.set_overrides(
            spec.id,
            priority=effective.priority if "priority" in current else None,
            keep_hot_seconds=effective.keep_hot_seconds if "keep_hot_seconds" in current else None,
        )
        store.record_event(kind="admin-update", model=spec.id, message=f"overrides now {current or 'none'}")
        return status(spec_of(spec.id))

    @router.post(
        "/models/{model_id:path}/load",
        summary="Load (pre-warm) a model",
        description="Start the model's engine. With `wait=true` the call returns once it is ready "
        "(errors in the OpenAI envelope: 503 no capacity or timeout, 502 engine failed); else at once "
        "with 202.",
        responses={
            **_ex({"model": "tiny-llama", "state": "ready"}),
            202: {
                "description": "Started",
                "content": {"application/json": {"example": {"model": "tiny-llama", "state": "launching"}}},
            },
        },
    )
    async def load(
        model_id: str,
        response: Response,
        wait: Annotated[bool, Query(description="Wait until ready.")] = False,
    ) -> dict[str, str]:
        spec = spec_of(model_id)
        if spec.external:
            raise GatewayError(400, f"{spec.id} is served by an external endpoint.", code="external_model")
        controller.reset_failures(spec.id)
        store.record_event(kind="admin-load", model=spec.id, message=f"load requested (wait={wait})")
        if controller.route(spec.id) is None:
            runner = controller.load(spec)
            if wait:
                await asyncio.wait({runner.ready})
                error = runner.ready.exception()
                if isinstance(error, GatewayError):  # admins see why (clients only that it failed)
                    failure = controller.failure(spec.id)
                    if failure is not None and failure.deployment_id == runner.id:
                        message = f"{error.message} {failure.error}"
                        raise GatewayError(
                            error.status, message, type=error.type, code=error.code, headers=error.headers
                        )
                    raise error
            else:
                response.status_code = 202
        return {"model": spec.id, "state": controller.phase(spec.id)}

    @router.post(
        "/models/{model_id:path}/unload",
        summary="Unload a model",
        description="Stop the model's engine (requests in flight get `drain_seconds`), or cancel its start.",
        responses=_ex({"model": "tiny-llama", "stopped": True}),
    )
    async def unload(model_id: str) -> dict[str, Any]:
        spec = spec_of(model_id)
        stopped = await controller.stop_model(spec.id, kind="admin-unload", reason="unloaded by an admin")
        return {"model": spec.id, "stopped": stopped}

    @router.get(
        "/info",
        summary="Gateway info",
        description="Version, provider, GPUs in use, deployments by state, and the settings "
        "(secrets masked).",
        responses=_ex(
            {"version": __version__, "provider": "local", "gpus_in_use": 1, "deployments": {"ready": 1}}
        ),
    )
    async def info() -> dict[str, Any]:
        by_state, gpus = controller.holdings()
        return {
            "version": __version__,
            "provider": controller.provider.name,
            "models": len(catalog.specs),
            "gpus_in_use": gpus,
            "deployments": by_state,
            "failures": len(controller.failures),
            "settings": settings_view(settings),
        }

    @router.get(
        "/clusters",
        summary="Clusters",
        description="The provider's view of its engines, like `sky status` for our clusters.",
        responses=_ex(
            [
                {
                    "name": "llmgw-tiny-llama-1a2b3c4d",
                    "status": "UP",
                    "deployment_id": "3f2a9c1b7e4d",
                    "model": "tiny-llama",
                }
            ]
        ),
    )
    async def clusters() -> list[dict[str, Any]]:
        return cluster_rows(await controller.provider.list())

    @router.get(
        "/events",
        summary="Events",
        description="Control decisions with their reasons, oldest first; filter by model, kind, time.",
        responses=_ex(
            [
                {
                    "at": "2026-11-27T10:00:00Z",
                    "kind": "idle-stop",
                    "model": "tiny-llama",
                    "deployment_id": "3f2a9c1b7e4d",
                    "message": "idle 601s > keep_hot_seconds 600",
                }
            ]
        ),
    )
    async def events(
        model: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 500,
    ) -> list[dict[str, Any]]:
        return event_rows(store.events(model=model, kind=kind, since=since, until=until, limit=limit))

    @router.get(
        "/costs",
        summary="Costs",
        description="GPU cost from the ledger, grouped by model, UTC day, cluster or phase, with the dollars "
        "of each phase: cold (launching and loading), serving, idle (kept hot without traffic) and failed "
        "(launches that never became ready). `format=csv` answers CSV. Default range: the last 7 days; an empty range has no rows.",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": [
                            {
                                "model": "tiny-llama",
                                "dollars": 1.25,
                                "gpu_hours": 1.25,
                                "cold_dollars": 0.1,
                                "serving_dollars": 0.9,
                                "idle_dollars": 0.25,
                                "failed_dollars": 0.0,
                            }
                        ]
                    },
                    "text/csv": {
                        "example": "model,dollars,gpu_hours,cold_dollars,serving_dollars,idle_dollars,"
                        "failed_dollars\ntiny-llama,1.25,1.25,0.1,0.9,0.25,0.0\n"
                    },
                }
            }
        },
    )
    async def costs(
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: GroupBy = "model",
        format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json",
    ) -> Any:
        now = controller.clock()
        until = _aware(until) or now
        since = _aware(since) or until - timedelta(days=7)
        rows = summarize(
            spans_of(store.intervals(since=since, until=until)),
            since=since,
            until=until,
            now=now,
            group_by=group_by,
        )
        if format == "csv":
            return PlainTextResponse(to_csv(rows, columns(group_by)), media_type="text/csv")
        return rows

    @router.get(
        "/failures",
        summary="Failed models",
        description="Models whose engine failed to start; requests for them get 400 until the TTL "
        "passes or an admin resets them.",
        responses=_ex(
            [{"model": "org/broken", "error": "engine exited (code 1)", "at": "2026-11-27T10:00:00Z"}]
        ),
    )
    async def failures() -> list[dict[str, Any]]:
        return [
            {"model": f.model, "error": f.error, "at": f.at.isoformat()} for f in controller.failures.values()
        ]

    @router.delete(
        "/failures",
        summary="Reset all failures",
        description="Forget every remembered failure.",
        responses=_ex({"reset": ["org/broken"]}),
    )
    async def reset_all_failures() -> dict[str, list[str]]:
        return {"reset": controller.reset_failures()}

    @router.delete(
        "/failures/{model_id:path}",
        summary="Reset one failure",
        description="Forget one model's failure: its next request starts it again.",
        responses=_ex({"reset": ["org/broken"]}),
    )
    async def reset_failure(model_id: str) -> dict[str, list[str]]:
        return {"reset": controller.reset_failures(model_id)}

    @router.post(
        "/reload",
        summary="Reload the reference file",
        description="Read and validate the model reference file again; on error (400) the old one "
        "stays. Running engines keep running.",
        responses=_ex({"models": 3, "added": ["org/new"], "removed": []}),
    )
    async def reload() -> dict[str, Any]:
        try:
            specs = load_reference(settings.model_reference)
        except ReferenceError as exc:
            raise GatewayError(400, str(exc), code="invalid_reference") from exc
        before = set(catalog.reference)
        catalog.replace_reference(specs)
        added, removed = sorted(set(specs) - before), sorted(before - set(specs))
        store.record_event(
            kind="admin-reload", message=f"{len(specs)} models; added {added}, removed {removed}"
        )
        return {"models": len(specs), "added": added, "removed": removed}

    @router.post(
        "/reset",
        summary="Reset",
        description="Unload every model and forget every failure.",
        responses=_ex({"stopped": ["tiny-llama"], "failures_reset": []}),
    )
    async def reset() -> dict[str, list[str]]:
        stopped = await controller.stop_all(kind="admin-reset", reason="reset by an admin")
        return {"stopped": stopped, "failures_reset": controller.reset_failures()}

    return router
