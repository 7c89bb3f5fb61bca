"""The admin API under /admin, behind a bearer token (Swagger's Authorize button works).

Model ids contain `/`, so model path parameters use the `path` converter:
`/admin/models/meta-llama/Llama-3.1-8B-Instruct/load`.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from gateway import __version__
from gateway.accounting.attribution import key_costs, rows_of, team_labels
from gateway.accounting.costs import GroupBy, columns, spans_of, summarize, to_csv
from gateway.api.deps import CatalogDep, ControllerDep, SettingsDep, StoreDep, require_acting, require_admin
from gateway.api.errors import GatewayError, error_doc, model_not_found
from gateway.api.schemas import (
    ClusterOut,
    CostRow,
    EventOut,
    FailureOut,
    InfoOut,
    LoadOut,
    ModelStatus,
    ModelUpdate,
    QueryTime,
    ReloadOut,
    ResetAllOut,
    ResetOut,
    UnloadOut,
    cluster_rows,
    event_rows,
    failure_rows,
    model_status,
    settings_view,
)
from gateway.config.reference import Catalog, ModelSpec, ReferenceError, load_reference
from gateway.control.fleet import Failure
from state import Store

COSTS_DAYS = 7  # the default range of /admin/costs, back from `until`

# Calls that start, stop or change models: on the controller-lease holder only.
ACTING = [Depends(require_acting)]

router = APIRouter(
    prefix="/admin",
    tags=["Admin"],
    dependencies=[Depends(require_admin)],
    responses={
        400: error_doc("Invalid parameters or body"),
        401: error_doc("Missing or wrong bearer token"),
        404: error_doc("Unknown model"),
        500: error_doc("Internal error (the message has a request id; details are in the log)"),
        502: error_doc("The engine failed to start (load with wait)"),
        503: error_doc("No capacity, or the start timed out (load with wait)"),
    },
)


def spec_of(catalog: Catalog, model_id: str) -> ModelSpec:
    spec = catalog.resolve(model_id)
    if spec is None:
        raise model_not_found(model_id)
    return spec


# -- models ------------------------------------------------------------------------------------


@router.get(
    "/models",
    summary="List models",
    description="Every model of the reference file with its state, effective priority and load.",
)
async def list_models(catalog: CatalogDep, controller: ControllerDep) -> list[ModelStatus]:
    return [model_status(spec, catalog, controller) for spec in catalog.specs.values()]


@router.get("/models/{model_id:path}", summary="One model", description="State and settings of one model.")
async def get_model(model_id: str, catalog: CatalogDep, controller: ControllerDep) -> ModelStatus:
    return model_status(spec_of(catalog, model_id), catalog, controller)


@router.patch(
    "/models/{model_id:path}",
    dependencies=ACTING,
    summary="Change priority or keep-hot time",
    description="Override `priority` and/or `keep_hot_seconds` (kept across restarts and reloads); give a "
    "field as null to return to the reference file's value. Applies to a running engine at once.",
)
async def update_model(
    model_id: str, update: ModelUpdate, catalog: CatalogDep, controller: ControllerDep, store: StoreDep
) -> ModelStatus:
    spec = spec_of(catalog, model_id)
    changes = {k: getattr(update, k) for k in update.model_fields_set}
    if not changes:
        raise GatewayError(400, "Give `priority` and/or `keep_hot_seconds`.", code="invalid_request")
    catalog.set_override(spec.id, **changes)
    current = catalog.overrides.get(spec.id, {})
    effective = catalog.resolve(spec.id) or spec  # unlisted models are resolved, not in `specs`
    store.set_overrides(
        spec.id,
        priority=effective.priority if "priority" in current else None,
        keep_hot_seconds=effective.keep_hot_seconds if "keep_hot_seconds" in current else None,
    )
    store.record_event(kind="admin-update", model=spec.id, message=f"overrides now {current or 'none'}")
    return model_status(effective, catalog, controller)


@router.post(
    "/models/{model_id:path}/load",
    dependencies=ACTING,
    summary="Load (pre-warm) a model",
    description="Start the model's engine. With `wait=true` the call returns once it is ready (errors in the "
    "OpenAI envelope: 503 no capacity or timeout, 502 engine failed); else at once with 202.",
    responses={202: {"model": LoadOut, "description": "Started"}},
)
async def load(
    model_id: str,
    response: Response,
    catalog: CatalogDep,
    controller: ControllerDep,
    store: StoreDep,
    wait: Annotated[bool, Query(description="Wait until ready.")] = False,
) -> LoadOut:
    spec = spec_of(catalog, model_id)
    if spec.external:
        raise GatewayError(400, f"{spec.id} is served by an external endpoint.", code="external_model")
    controller.reset_failures(spec.id)
    store.record_event(kind="admin-load", model=spec.id, message=f"load requested (wait={wait})")
    if controller.route(spec.id) is None:
        runner = controller.load(spec)  # no request waits: nothing joins the queue
        if not wait:
            response.status_code = 202
        else:  # an admin who goes away cancels nothing: the runner owns the start
            await asyncio.wait({runner.ready})
            if (error := runner.ready.exception()) is not None:
                raise _admin_view(error, controller.failure(spec.id), runner.id)
    return LoadOut(model=spec.id, state=controller.phase(spec.id))


def _admin_view(error: BaseException, failure: Failure | None, deployment_id: str) -> BaseException:
    """A start's error as an admin sees it: with the cause (clients see only that it failed)."""
    if isinstance(error, GatewayError) and failure is not None and failure.deployment_id == deployment_id:
        return GatewayError(
            error.status,
            f"{error.message} {failure.error}",
            type=error.type,
            code=error.code,
            headers=error.headers,
        )
    return error


@router.post(
    "/models/{model_id:path}/unload",
    dependencies=ACTING,
    summary="Unload a model",
    description="Stop the model's engine (requests in flight get `drain_seconds`), or cancel its start.",
)
async def unload(model_id: str, catalog: CatalogDep, controller: ControllerDep) -> UnloadOut:
    spec = catalog.resolve(model_id)
    # A model a reload removed may still have an engine (until its keep-hot time): unloadable.
    model = spec.id if spec is not None else model_id
    if spec is None and not controller.runners(model):
        raise model_not_found(model_id)
    stopped = await controller.stop_model(model, kind="admin-unload", reason="unloaded by an admin")
    return UnloadOut(model=model, stopped=stopped)


# -- the gateway -------------------------------------------------------------------------------


@router.get(
    "/info",
    summary="Gateway info",
    description="Version, provider, GPUs in use, deployments by state, and the settings (secrets masked).",
)
async def info(settings: SettingsDep, catalog: CatalogDep, controller: ControllerDep) -> InfoOut:
    by_state, gpus = controller.holdings()
    return InfoOut(
        version=__version__,
        provider=controller.provider.name,
        models=len(catalog.specs),
        gpus_in_use=gpus,
        deployments=by_state,
        failures=len(controller.failures),
        settings=settings_view(settings),
    )


@router.get(
    "/clusters",
    summary="Clusters",
    description="The provider's view of its engines, like `sky status` for our clusters, with the "
    "deployment holding each now and its state (`spare`: kept up for a cold start to swap onto).",
)
async def clusters(controller: ControllerDep) -> list[ClusterOut]:
    return cluster_rows(await controller.provider.list(controller.ctx.instance_id), controller)


@router.get(
    "/events",
    summary="Events",
    description="Control decisions with their reasons, oldest first; filter by model, kind, time. Times "
    "are ISO 8601; a date alone is its midnight, and a time without a zone is UTC.",
)
async def events(
    store: StoreDep,
    model: str | None = None,
    kind: str | None = None,
    since: Annotated[QueryTime | None, Query(description="From this time (inclusive).")] = None,
    until: Annotated[QueryTime | None, Query(description="Before this time.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 500,
) -> list[EventOut]:
    found = await run_in_threadpool(
        store.events, model=model, kind=kind, since=since, until=until, limit=limit
    )
    return event_rows(found)


COSTS_CSV_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/csv": {
                "schema": {"type": "string"},
                "example": "model,dollars,gpu_hours,cold_dollars,serving_dollars,idle_dollars,spare_dollars,"
                "failed_dollars\ntiny-llama,1.3,1.3,0.1,0.9,0.25,0.05,0.0\n",
            }
        }
    }
}


@router.get(
    "/costs",
    summary="Costs",
    description="GPU cost from the ledger, grouped by model, UTC day, cluster, phase, client API key or the "
    "keys' team, with the dollars of each phase: cold (launching and loading), serving, idle (kept hot "
    "without traffic), spare (kept up after the keep-hot time for another cold start to swap onto) and "
    "failed (launches that never became ready). By key: a start is the starting key's "
    "(`admin` for loads and pre-warms), serving and idle time of a model's day is split by the tokens each key "
    "used on it that day; `-` is time nobody can be named for. `format=csv` answers CSV. Default range: the last 7 days; an empty range has "
    "no rows. Times are ISO 8601; a date alone is its midnight, and a time without a zone is UTC.",
    response_model=list[CostRow],
    response_model_exclude_unset=True,  # of model, day, cluster and phase: only the group's key
    responses=COSTS_CSV_DOC,
)
async def costs(
    store: StoreDep,
    controller: ControllerDep,
    since: Annotated[QueryTime | None, Query(description="Default: 7 days before `until`.")] = None,
    until: Annotated[QueryTime | None, Query(description="Default: now.")] = None,
    group_by: GroupBy = "model",
    format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json",
) -> Any:
    now = controller.clock()
    until = until or now
    since = since or until - timedelta(days=COSTS_DAYS)
    rows = await run_in_threadpool(cost_rows, store, since, until, now, group_by)
    if format == "csv":
        return PlainTextResponse(to_csv(rows, columns(group_by)), media_type="text/csv")
    return rows


def cost_rows(
    store: Store, since: datetime, until: datetime, now: datetime, group_by: GroupBy
) -> list[dict[str, Any]]:
    if group_by == "key" or group_by == "team":
        acc = key_costs(store, since=since, until=until, now=now)
        return rows_of(acc, group_by, team_labels(store) if group_by == "team" else {})
    spans = spans_of(store.intervals(since=since, until=until))
    return summarize(spans, since=since, until=until, now=now, group_by=group_by)


# -- failures, reload, reset -------------------------------------------------------------------


@router.get(
    "/failures",
    summary="Failed models",
    description="Models whose engine failed to start; requests for them get 400 until the TTL passes or an "
    "admin resets them.",
)
async def failures(controller: ControllerDep) -> list[FailureOut]:
    return failure_rows(list(controller.failures.values()))


@router.delete(
    "/failures",
    summary="Reset all failures",
    description="Forget every remembered failure.",
    dependencies=ACTING,
)
async def reset_all_failures(controller: ControllerDep) -> ResetOut:
    return ResetOut(reset=controller.reset_failures())


@router.delete(
    "/failures/{model_id:path}",
    dependencies=ACTING,
    summary="Reset one failure",
    description="Forget one model's failure: its next request starts it again.",
)
async def reset_failure(model_id: str, controller: ControllerDep) -> ResetOut:
    return ResetOut(reset=controller.reset_failures(model_id))


@router.post(
    "/reload",
    dependencies=ACTING,
    summary="Reload the reference file",
    description="Read and validate the model reference file again; on error (400) the old one stays. "
    "Running engines keep running.",
)
async def reload(settings: SettingsDep, catalog: CatalogDep, store: StoreDep) -> ReloadOut:
    try:
        specs = load_reference(settings.model_reference)
    except ReferenceError as exc:
        raise GatewayError(400, str(exc), code="invalid_reference") from exc
    before = set(catalog.reference)
    catalog.replace_reference(specs)
    added, removed = sorted(set(specs) - before), sorted(before - set(specs))
    store.record_event(kind="admin-reload", message=f"{len(specs)} models; added {added}, removed {removed}")
    return ReloadOut(models=len(specs), added=added, removed=removed)


@router.post(
    "/reset",
    summary="Reset",
    description="Unload every model and forget every failure.",
    dependencies=ACTING,
)
async def reset(catalog: CatalogDep, controller: ControllerDep) -> ResetAllOut:
    stopped = await controller.stop_all(kind="admin-reset", reason="reset by an admin")
    return ResetAllOut(stopped=stopped, failures_reset=controller.reset_failures())
