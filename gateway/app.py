"""The FastAPI application. `create_app(settings, provider, clock)` wires the parts together;
nothing is created at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import __version__
from gateway.accounting.exposition import render
from gateway.accounting.ledger import Ledger, PriceBook
from gateway.accounting.loop_lag import watch_loop_lag
from gateway.accounting.metrics import CostTotals, KnownModel, Metrics, StateCollector, pick_known
from gateway.accounting.usage import UsageRecorder
from gateway.api.admin import admin_router
from gateway.api.errors import install_error_handlers
from gateway.api.openai_routes import OpenAIGateway, openai_router
from gateway.clock import Clock, system_clock
from gateway.config.reference import Catalog, load_reference
from gateway.config.settings import Settings
from gateway.control.activity import Activity
from gateway.control.controller import Controller
from gateway.control.lease import ControllerLease, stop_this_process
from gateway.control.reaper import Reaper
from gateway.control.reconcile import reconcile
from gateway.proxy.upstream import Proxy
from state import ModelRecord, Store
from state.writer import Writer
from tasks.local import LocalConfig, LocalProvider
from tasks.provider import Provider

log = logging.getLogger(__name__)

DESCRIPTION = """
Serverless-style LLM serving. Send an OpenAI request for a model; if no engine serves it, the
gateway starts one (a local vLLM process or a SkyPilot cluster), holds the request until the
engine is ready, and proxies it. Idle engines are stopped after `keep_hot_seconds`.

Errors are in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.
"""


def build_provider(settings: Settings) -> Provider:
    if settings.provider == "local":
        return LocalProvider(
            LocalConfig(
                engine_command=settings.local.engine_command,
                gpu_ids=tuple(settings.local.resolved_gpu_ids()),
                log_dir=settings.data_dir / "engines",
                stop_grace_seconds=settings.local.stop_grace_seconds,
                env=settings.local.env,
            )
        )
    return build_skypilot_provider(settings)


def build_skypilot_provider(settings: Settings) -> Provider:
    try:
        from tasks.sky_client import SdkSkyClient
        from tasks.sky_task import SkyTaskConfig
        from tasks.skypilot import SkyPilotConfig, SkyPilotProvider
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ProviderUnavailable(
            f"provider 'skypilot' needs `pip install llm-gateway[skypilot]`: {exc}"
        ) from exc
    sky = settings.skypilot
    try:
        client = SdkSkyClient()
    except ImportError as exc:
        raise ProviderUnavailable(
            f"provider 'skypilot' needs `pip install llm-gateway[skypilot]`: {exc}"
        ) from exc
    task = SkyTaskConfig(
        default_accelerators=tuple(sky.default_accelerators),
        disk_size_gb=sky.disk_size_gb,
        use_spot=sky.use_spot,
        vllm_version=sky.vllm_version,
        image=sky.image,
        infra=sky.infra,
        extra_labels=dict(sky.labels),
    )
    return SkyPilotProvider(
        client,
        SkyPilotConfig(
            task=task, failsafe_minutes=sky.failsafe_minutes, job_check_seconds=sky.job_check_seconds
        ),
    )


class ProviderUnavailable(ValueError):
    pass


def price_book(settings: Settings, provider: str) -> PriceBook:
    costs = settings.costs
    if provider == "local":
        return PriceBook(per_gpu_hour={}, default_gpu_hour=costs.local_gpu_hour)
    return PriceBook(per_gpu_hour=costs.gpu_hour, default_gpu_hour=costs.default_gpu_hour)


def create_app(
    settings: Settings,
    provider: Provider | None = None,
    clock: Clock = system_clock,
    on_lease_lost: Callable[[], None] = stop_this_process,
) -> FastAPI:
    catalog = Catalog(load_reference(settings.model_reference), allow_unlisted=settings.allow_unlisted_models)
    provider = provider or build_provider(settings)
    store = Store(settings.resolved_database_url)
    writer = Writer()  # every database write of the data plane goes through it
    metrics = Metrics()
    activity = Activity()
    usage = UsageRecorder(
        store,
        metrics,
        writer,
        raw_rows=settings.usage.raw_rows,
        retention_days=settings.usage.retention_days,
        rollup_retention_days=settings.usage.rollup_retention_days,
    )
    ledger = Ledger(store, price_book(settings, provider.name), provider=provider.name)
    controller = Controller(
        settings=settings,
        provider=provider,
        store=store,
        clock=clock,
        activity=activity,
        catalog=catalog,
        ledger=ledger,
        metrics=metrics,
        writer=writer,
    )
    reaper = Reaper(controller, usage, settings)
    lease = ControllerLease(store, clock, seconds=settings.controller_lease_seconds)
    proxy = Proxy(
        settings.upstream_timeout_seconds,
        activity,
        usage,
        clock,
        metrics,
        on_engine_error=controller.engine_error,
    )
    gateway = OpenAIGateway(
        settings=settings,
        catalog=catalog,
        controller=controller,
        proxy=proxy,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.create_all()
        await lease.acquire()  # one control loop per database: stand by while another gateway runs it
        lease_task = asyncio.create_task(lease.keep(on_lease_lost), name="controller lease")
        catalog.load_overrides(store.overrides())
        store.upsert_models(
            ModelRecord(id=s.id, gpus_per_replica=s.gpus_per_replica, priority=s.priority, kind=s.kind)
            for s in catalog.specs.values()
        )
        await reconcile(controller, catalog, unknown=settings.reconcile_unknown)
        metrics.known(known_models(catalog, store, settings.metrics_known_models))
        data_tasks = [
            asyncio.create_task(watch_loop_lag(metrics.loop_lag), name="loop lag"),
            asyncio.create_task(usage.run(settings.usage.flush_seconds, clock), name="usage flush"),
        ]
        loop_task = asyncio.create_task(reaper.run(), name="reaper")
        log.info("gateway ready: %d models, provider %s", len(catalog.specs), provider.name)
        try:
            yield
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await controller.shutdown()
            await reaper.settle()
            lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease_task
            lease.release()
            for task in data_tasks:
                task.cancel()
            await asyncio.gather(*data_tasks, return_exceptions=True)
            await controller.flush_activity()
            await usage.flush()
            await proxy.close()
            writer.close()
            store.close()
            log.info("gateway stopped")

    app = FastAPI(
        title="llm-gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "OpenAI", "description": "OpenAI-compatible API; engines start on demand."},
            {"name": "Gateway", "description": "Health and model list."},
            {
                "name": "Admin",
                "description": "Load, unload, prioritise and inspect models. "
                "Bearer token: the gateway's `admin_token` (Authorize button).",
            },
        ],
    )
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.controller = controller
    app.state.store = store
    app.state.reaper = reaper
    app.state.usage = usage
    app.state.writer = writer
    install_error_handlers(app)

    app.include_router(openai_router(gateway))
    app.include_router(admin_router(settings=settings, catalog=catalog, controller=controller, store=store))

    cost_totals = CostTotals(store, writer, clock)
    scraped: list[dict[str, Any]] = [{}]  # the snapshot the collector reads, replaced by each scrape

    def take_snapshot(costs: dict[tuple[str, str], tuple[float, float]]) -> None:
        by_state, gpus = controller.holdings()
        scraped[0] = {
            "deployments": by_state,
            "gpus_in_use": gpus,
            "waiting": controller.waiting_all(),
            "costs": costs,
            "writes_pending": writer.pending,
        }

    take_snapshot({})
    metrics.add_collector(StateCollector(lambda: scraped[0], metrics))

    @app.get(
        "/metrics",
        tags=["Gateway"],
        summary="Prometheus metrics",
        description="Requests, latency (and the gateway's own overhead), cold-start phases, deployments, "
        "GPUs in use, waiting requests, tokens, and cost in dollars and GPU-seconds by model and phase.",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"example": "llmgw_gpus_in_use 1.0\n"}}}},
    )
    async def prometheus_metrics() -> Response:
        take_snapshot(await cost_totals.get())
        return Response(await render(metrics.collectors()), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/health",
        tags=["Gateway"],
        summary="Liveness",
        description="200 while the gateway runs.",
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
    )
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/v1/models",
        tags=["OpenAI"],
        summary="List models",
        description="The models of the reference file with their current state "
        "(`ready`, `loading`, `stopped`, ... or `external` for models served elsewhere).",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "object": "list",
                            "data": [
                                {
                                    "id": "tiny-llama",
                                    "object": "model",
                                    "created": 0,
                                    "owned_by": "llm-gateway",
                                    "state": "stopped",
                                    "priority": 0,
                                    "gpus_per_replica": 1,
                                }
                            ],
                        }
                    }
                }
            }
        },
    )
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [_model_entry(s.id, catalog, controller) for s in catalog.specs.values()],
        }

    return app


def known_models(catalog: Catalog, store: Store, limit: int) -> list[KnownModel]:
    """The models whose series exist from startup (see `Metrics.known`)."""
    specs = list(catalog.specs.values())
    models = [KnownModel(s.id, s.kind, launchable=not s.external) for s in specs]
    if len(models) <= limit:
        return models
    return pick_known(
        models, last_used=store.models_last_used(), priority={s.id: s.priority for s in specs}, limit=limit
    )


def _model_entry(model_id: str, catalog: Catalog, controller: Controller) -> dict[str, Any]:
    spec = catalog.specs[model_id]
    return {
        "id": spec.id,
        "object": "model",
        "created": 0,
        "owned_by": "llm-gateway",
        "state": "external" if spec.external else controller.phase(spec.id),
        "priority": spec.priority,
        "gpus_per_replica": spec.gpus_per_replica,
        "kind": spec.kind,
    }
