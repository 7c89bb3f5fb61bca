"""The simulator's adapter to the controller: the ONLY module that reads or calls controller
internals, so it stays small and says plainly what it reaches into.

- a request mirrors `OpenAIGateway.handle` (route if ready, else the remembered failure, else
  wait for the start as a `Waiter`: plain requests wait, streams poll like the `: loading`
  loop) and the proxy's accounting (`activity.track`, `engine_error` when the engine does not
  answer);
- admin operations go through the real admin API over ASGI (no internals needed);
- `owners`, `routes`, `replicas`, `in_flight` and `lease_holder_id` read what the invariants compare.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from gateway.api.errors import GatewayError, bad_gateway, internal_error, model_not_found
from gateway.control.controller import Controller
from gateway.control.fleet import Route
from gateway.control.lease import ControllerLease


def controller(app: FastAPI) -> Controller:
    ctl: Controller = app.state.controller
    return ctl


def owners(app: FastAPI) -> set[str]:
    """Deployment ids this controller currently holds in memory (what it will drive to the end)."""
    return {r.id for r in controller(app).runners() if not r.task.done() and not r.fenced}


def routes(app: FastAPI) -> dict[str, str | None]:
    return {model: route.deployment_id for model, route in controller(app).routes.items()}


def replicas(app: FastAPI) -> dict[str, tuple[int, int]]:
    """(serving, starting) deployments per model of this controller."""
    out: dict[str, tuple[int, int]] = {}
    for r in controller(app).runners():
        serving, starting = out.get(r.model, (0, 0))
        out[r.model] = (serving + r.serving, starting + r.starting)
    return out


def in_flight(app: FastAPI, model: str) -> int:
    return controller(app).activity.in_flight(model)


def effective(app: FastAPI, model: str) -> tuple[int, float, float] | None:
    """(priority, keep_hot_seconds, spare_seconds) the controller applies to `model` now; None
    if unknown."""
    spec = app.state.catalog.resolve(model)
    if spec is None:
        return None
    settings = app.state.settings
    keep, spare = spec.keep_hot_seconds, spec.spare_seconds
    return (
        spec.priority,
        keep if keep is not None else settings.keep_hot_seconds,
        spare if spare is not None else settings.spare_seconds,
    )


def lease_holder_id(app: FastAPI) -> str:
    lease: ControllerLease = app.state.lease
    return lease.holder


@dataclass
class Request:
    """One client request as the simulator follows it."""

    id: int
    gateway: str
    model: str
    stream: bool
    hold: float  # seconds the engine takes to answer it
    started: float
    phase: str = "new"  # new, waiting, in-flight, done
    wait_started: float | None = None
    wait_ended: float | None = None
    deployment_id: str | None = None
    endpoint: str | None = None
    outcome: str | None = None
    client_cancelled: bool = False
    stalled: bool = False  # its gateway was frozen while it was open
    task: asyncio.Task[None] | None = field(default=None, repr=False)


async def request(
    app: FastAPI, rec: Request, *, serves: Callable[[Route], bool], now: Callable[[], float]
) -> None:
    """Run one request against the controller; raises what the client would get (GatewayError:
    anything else is what the gateway's catch-all turns into a 500 envelope)."""
    try:
        await _request(app, rec, serves=serves, now=now)
    except (GatewayError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise internal_error("sim") from exc


async def _request(
    app: FastAPI, rec: Request, *, serves: Callable[[Route], bool], now: Callable[[], float]
) -> None:
    ctl = controller(app)
    spec = app.state.catalog.resolve(rec.model)
    if spec is None:
        raise model_not_found(rec.model)
    route = ctl.route(spec.id)
    if route is None:
        failure = ctl.failure(spec.id)
        if failure is not None:
            raise GatewayError(400, f"{spec.id} failed to start recently", code="model_failed")
        rec.phase, rec.wait_started = "waiting", now()
        waiter = ctl.admit(spec)  # 503 queue_full before anything is sent
        try:
            if rec.stream:  # the `: loading` comment loop of a cold stream
                while not waiter.runner.ready.done():
                    await asyncio.wait(
                        {waiter.runner.ready}, timeout=app.state.settings.loading_comment_seconds
                    )
            route = await waiter.wait()
        finally:
            waiter.leave()
        rec.wait_ended = now()
    rec.phase, rec.deployment_id, rec.endpoint = "in-flight", route.deployment_id, route.base_url
    with ctl.activity.track(spec.id, route.deployment_id, ctl.clock):
        if not serves(route):
            ctl.engine_error(route, "unreachable: ClientConnectorError")
            raise bad_gateway(f"The engine for {spec.id} did not answer: ClientConnectorError")
        await asyncio.sleep(rec.hold)
        if not serves(route):
            ctl.engine_error(route, "broke off an answer: ServerDisconnectedError")
            raise bad_gateway(f"The engine for {spec.id} broke off its answer")


@dataclass
class AdminReply:
    status: int
    body: Any
    envelope: bool  # an error in OpenAI's envelope (always True for < 400)


class Admin:
    """The admin API of one app, called in-process over ASGI."""

    def __init__(self, app: FastAPI, token: str) -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(
            transport=transport, base_url="http://gateway", headers={"Authorization": f"Bearer {token}"}
        )

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> AdminReply:
        response = await self.client.request(method, path, json=body)
        try:
            parsed = response.json()
        except json.JSONDecodeError:
            parsed = response.text
        ok = response.status_code < 400 or (
            isinstance(parsed, dict)
            and isinstance(parsed.get("error"), dict)
            and {"message", "type", "param", "code"} <= set(parsed["error"])
        )
        return AdminReply(response.status_code, parsed, ok)

    async def load(self, model: str, wait: bool) -> AdminReply:
        return await self.call("POST", f"/admin/models/{model}/load?wait={str(wait).lower()}")

    async def unload(self, model: str) -> AdminReply:
        return await self.call("POST", f"/admin/models/{model}/unload")

    async def patch(self, model: str, values: dict[str, Any]) -> AdminReply:
        return await self.call("PATCH", f"/admin/models/{model}", values)

    async def reload(self) -> AdminReply:
        return await self.call("POST", "/admin/reload")

    async def reset(self) -> AdminReply:
        return await self.call("POST", "/admin/reset")

    async def close(self) -> None:
        await self.client.aclose()
