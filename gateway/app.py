"""The FastAPI application. `create_app(settings, provider, clock)` wires the parts together;
nothing is created at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from gateway import __version__
from gateway.accounting.ledger import Ledger, PriceBook
from gateway.accounting.metrics import Metrics, StateCollector
from gateway.accounting.usage import UsageRecorder
from gateway.api import admin, meta
from gateway.api.deps import require_admin_token
from gateway.api.errors import install_error_handlers
from gateway.api.openai_routes import OpenAIGateway, openai_router
from gateway.clock import Clock, system_clock
from gateway.config.reference import Catalog, load_reference
from gateway.config.settings import Settings
from gateway.control.activity import Activity
from gateway.control.context import ControlContext, gateway_secret, new_deployment_id
from gateway.control.controller import Controller
from gateway.control.fencing import FencedProvider
from gateway.control.lease import ControllerLease, stop_this_process
from gateway.control.reaper import Reaper
from gateway.control.reconcile import reconcile
from gateway.proxy.upstream import Proxy
from state import ModelRecord, Store
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
    new_id: Callable[[], str] = new_deployment_id,
) -> FastAPI:
    require_admin_token(settings)
    catalog = Catalog(load_reference(settings.model_reference), allow_unlisted=settings.allow_unlisted_models)
    store = Store(settings.resolved_database_url)
    store.create_all()
    provider = provider or build_provider(settings)
    lease = ControllerLease(store, clock, seconds=settings.controller_lease_seconds)
    metrics = Metrics()
    activity = Activity()
    usage = UsageRecorder(store, metrics)
    ctx = ControlContext(
        settings=settings,
        provider=FencedProvider(provider, lambda: lease.held),
        store=store,
        clock=clock,
        activity=activity,
        catalog=catalog,
        ledger=Ledger(store, price_book(settings, provider.name), provider=provider.name),
        metrics=metrics,
        new_id=new_id,
        instance_id=store.instance_id(),
        secret=gateway_secret(settings),
    )
    controller = Controller(ctx)
    reaper = Reaper(controller, usage, settings)
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

    def lease_lost() -> None:
        controller.abandon()  # stop acting at once; the new holder adopts the engines
        on_lease_lost()

    async def start() -> asyncio.Task[None]:
        await lease.acquire()  # one control loop per database: stand by while another gateway runs it
        lease_task = asyncio.create_task(lease.keep(lease_lost), name="controller lease")
        catalog.load_overrides(store.overrides())
        store.upsert_models(
            ModelRecord(id=s.id, gpus_per_replica=s.gpus_per_replica, priority=s.priority, kind=s.kind)
            for s in catalog.specs.values()
        )
        await reconcile(controller, catalog, unknown=settings.reconcile_unknown)
        # Series that exist from the start: Prometheus' increase() ignores a series' first sample.
        for spec in catalog.specs.values():
            if not spec.external:
                for phase in ("launching", "loading", "total"):
                    metrics.cold_start.labels(model=spec.id, phase=phase)
        return lease_task

    async def stop(lease_task: asyncio.Task[None], loop_task: asyncio.Task[None]) -> None:
        """Each step runs whatever the one before it did: one failure skips nothing."""
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        await _guarded(controller.shutdown)
        await _guarded(reaper.settle)
        lease_task.cancel()
        await asyncio.gather(lease_task, return_exceptions=True)
        await _guarded(lease.release)
        await _guarded(controller.flush_activity)
        await _guarded(usage.flush)
        await _guarded(proxy.close)
        store.close()
        log.info("gateway stopped")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lease_task = await start()
        loop_task = reaper.start()
        log.info("gateway ready: %d models, provider %s", len(catalog.specs), provider.name)
        try:
            yield
        finally:
            await stop(lease_task, loop_task)

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
    app.state.lease = lease
    app.state.proxy = proxy
    app.state.metrics = metrics
    app.state.scrape = meta.ScrapeState(controller, store)
    metrics.add_collector(StateCollector(app.state.scrape))
    install_error_handlers(app)
    app.include_router(openai_router(gateway))
    app.include_router(admin.router)
    app.include_router(meta.router)
    return app


async def _guarded(step: Callable[[], object]) -> None:
    try:
        result = step()
        if asyncio.iscoroutine(result):
            await result
    except Exception:
        log.exception("shutdown step %s failed; going on", getattr(step, "__qualname__", step))
