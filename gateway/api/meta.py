"""/health, /metrics and /v1/models.

/metrics reads what is proportional to the models: the controller's memory (on the loop) and
the store's cost totals, one row per model and phase plus the open intervals (in a worker
thread, so a slow database never stalls proxying)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from gateway.accounting.metrics import Metrics
from gateway.api.deps import CatalogDep, ControllerDep
from gateway.api.schemas import HealthOut, ModelList, model_entry
from gateway.control.controller import Controller
from state import Store

router = APIRouter()


class ScrapeState:
    """What the state collector reports: taken by `refresh()` just before each scrape, so the
    collector (called synchronously by prometheus_client) only reads a snapshot."""

    def __init__(self, controller: Controller, store: Store) -> None:
        self.controller = controller
        self.store = store
        self._latest: dict[str, Any] = {"deployments": {}, "gpus_in_use": 0, "waiting": {}, "costs": {}}

    async def refresh(self) -> None:
        totals = await run_in_threadpool(self.store.cost_totals, self.controller.clock())
        by_state, gpus = self.controller.holdings()
        self._latest = {
            "deployments": by_state,
            "gpus_in_use": gpus,
            "waiting": self.controller.waiting_all(),
            # StateCollector takes (GPU-seconds, dollars) by (model, phase).
            "costs": {key: (t.gpu_seconds, t.dollars) for key, t in totals.items()},
        }

    def __call__(self) -> dict[str, Any]:
        return self._latest


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_scrape(request: Request) -> ScrapeState:
    scrape: ScrapeState = request.app.state.scrape
    return scrape


@router.get(
    "/metrics",
    tags=["Gateway"],
    summary="Prometheus metrics",
    description="Requests, latency (and the gateway's own overhead), cold-start phases, deployments, GPUs in "
    "use, waiting requests, tokens, and cost in dollars and GPU-seconds by model and phase.",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"example": "llmgw_gpus_in_use 1.0\n"}}}},
)
async def prometheus_metrics(
    metrics: Annotated[Metrics, Depends(get_metrics)], scrape: Annotated[ScrapeState, Depends(get_scrape)]
) -> Response:
    await scrape.refresh()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", tags=["Gateway"], summary="Liveness", description="200 while the gateway runs.")
async def health() -> HealthOut:
    return HealthOut()


@router.get(
    "/v1/models",
    tags=["OpenAI"],
    summary="List models",
    description="The models of the reference file with their current state (`ready`, `loading`, `stopped`, "
    "... or `external` for models served elsewhere).",
)
async def list_models(catalog: CatalogDep, controller: ControllerDep) -> ModelList:
    return ModelList(data=[model_entry(spec, controller) for spec in catalog.specs.values()])
