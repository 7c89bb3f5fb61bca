"""The FastAPI application. `create_app(settings, provider, clock)` wires the parts together;
nothing is created at import time."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

from fastapi import FastAPI
from starlette.types import ASGIApp

from gateway import __version__
from gateway.accounting.metrics import CostTotals, StateCollector, TeamCosts
from gateway.api import admin, admin_keys, meta
from gateway.api.deps import require_admin_token
from gateway.api.errors import install_error_handlers
from gateway.api.openai_routes import OpenAIFront, OpenAIGateway, openai_router
from gateway.clock import Clock, system_clock
from gateway.config.settings import Settings
from gateway.control.context import new_deployment_id
from gateway.control.lease import stop_this_process
from gateway.runtime import ProviderUnavailable, Runtime, build_provider
from tasks.provider import Provider

log = logging.getLogger(__name__)

__all__ = ["ProviderUnavailable", "build_provider", "create_app"]

DESCRIPTION = """
Serverless-style LLM serving. Send an OpenAI request for a model; if no engine serves it, the
gateway starts one (a local vLLM process or a SkyPilot cluster), holds the request until the
engine is ready, and proxies it. Idle engines are stopped after `keep_hot_seconds`.

Errors are in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.
"""


class GatewayApp(FastAPI):
    """FastAPI with the OpenAI front outside its whole middleware stack: the three OpenAI POST
    routes are answered before FastAPI's own layers (its telemetry check, body limit and error
    middleware were ~6% of a request's CPU at c=1); every other request goes through them."""

    front: OpenAIGateway | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else OpenAIFront(stack, self.front)


def create_app(
    settings: Settings,
    provider: Provider | None = None,
    clock: Clock = system_clock,
    on_lease_lost: Callable[[], None] = stop_this_process,
    new_id: Callable[[], str] = new_deployment_id,
    db_executor: Executor | None = None,
) -> FastAPI:
    """`db_executor`: where the database writer runs its jobs (default: a thread of its own; a
    simulator passes one that runs them at once, to stay deterministic)."""
    require_admin_token(settings)
    rt = Runtime.build(
        settings, provider, clock, on_lease_lost=on_lease_lost, new_id=new_id, db_executor=db_executor
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # a startup that fails still shuts down: the lease released, its tasks ended
            await rt.start()
            yield
        finally:
            await rt.stop()

    app = GatewayApp(
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
    app.state.runtime = rt
    app.state.catalog = rt.catalog
    app.state.controller = rt.controller
    app.state.store = rt.store
    app.state.reaper = rt.reaper
    app.state.usage = rt.usage
    app.state.lease = rt.lease
    app.state.proxy = rt.proxy
    app.state.metrics = rt.metrics
    app.state.writer = rt.writer
    app.state.keys = rt.keys
    costs, teams = CostTotals(rt.store, rt.writer, clock), TeamCosts(rt.store, rt.writer, clock)
    app.state.scrape = meta.ScrapeState(rt.controller, costs, rt.writer, teams)
    rt.metrics.add_collector(StateCollector(app.state.scrape, rt.metrics))
    app.front = rt.gateway
    install_error_handlers(app)
    app.include_router(openai_router(rt.gateway))
    app.include_router(admin_keys.router)
    app.include_router(admin.router)
    app.include_router(meta.router)
    return app
