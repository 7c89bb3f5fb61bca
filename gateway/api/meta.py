"""/health, /metrics and /v1/models.

/metrics reads what is proportional to the models: the controller's memory (on the loop) and
the cost totals, summed by the database in a job of the writer and cached (so no cost row is
read on the loop); the text is rendered in slices so the loop runs between them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.accounting.exposition import render
from gateway.accounting.metrics import CostTotals, Metrics, TeamCosts
from gateway.api.deps import CatalogDep, ControllerDep
from gateway.api.schemas import HealthOut, ModelList, model_entry
from gateway.auth.keyring import KeyRing
from gateway.control.controller import Controller
from state.writer import Writer

router = APIRouter()


class ScrapeState:
    """What the state collector reports: taken by `refresh()` just before each scrape, so the
    collector (called synchronously by prometheus_client) only reads a snapshot."""

    def __init__(
        self, controller: Controller, costs: CostTotals, writer: Writer, teams: TeamCosts | None = None
    ) -> None:
        self.controller = controller
        self.costs = costs
        self.teams = teams
        self.writer = writer
        self._latest: dict[str, Any] = {}
        self.take({})

    def take(
        self, costs: dict[tuple[str, str], tuple[float, float]], teams: dict[str, float] | None = None
    ) -> None:
        by_state, gpus = self.controller.holdings()
        self._latest = {
            "deployments": by_state,
            "gpus_in_use": gpus,
            "waiting": self.controller.waiting_all(),
            "costs": costs,  # (GPU-seconds, dollars) by (model, phase)
            "team_costs": teams or {},  # dollars this month by team
            "writes_pending": self.writer.pending,
        }

    async def refresh(self) -> None:
        self.take(await self.costs.get(), await self.teams.get() if self.teams is not None else None)

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
    return Response(await render(metrics.collectors()), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", tags=["Gateway"], summary="Liveness", description="200 while the gateway runs.")
async def health() -> HealthOut:
    return HealthOut()


@router.get(
    "/v1/models",
    tags=["OpenAI"],
    summary="List models",
    description="The models of the reference file with their current state (`ready`, `loading`, `stopped`, "
    "... or `external` for models served elsewhere); with client API keys, those the key may use.",
)
async def list_models(request: Request, catalog: CatalogDep, controller: ControllerDep) -> ModelList:
    keys: KeyRing = request.app.state.keys
    key = keys.authenticate(request.headers.get("authorization"))
    specs = [s for s in catalog.specs.values() if key is None or key.allows(s.id)]
    return ModelList(data=[model_entry(spec, controller) for spec in specs])
