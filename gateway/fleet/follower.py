"""A gateway that is not the lease holder: it serves all the same.

Requests go to the ready deployments read from the store (every `fleet.poll_seconds`, and at
once on PostgreSQL's NOTIFY), with the engine's key derived as the holder derives it. A request
for a model with none ready waits here, as it would on the holder (the same queue bound,
`: loading` comments, cold-start timeout, errors): the follower reports its waiting requests
(at once for a model's first one) and the holder launches; the waiter gets its route once the
store says the deployment is ready, or the holder's error once the store says the start ended.
The follower also reports its requests in flight and last-used times, for the holder's idle
teardown, drains and autoscaler, and that it lives (its presence: a holder that stops hands its
engines over to a live follower). Reports are written by the database writer, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.api.errors import GatewayError, bad_gateway, unavailable
from gateway.clock import Clock
from gateway.config.reference import ModelSpec
from gateway.config.settings import Settings
from gateway.control.activity import Activity
from gateway.control.controller import RETRY_AFTER_QUEUE_FULL
from gateway.control.fleet import Failure, Route
from gateway.control.runner import RETRY_AFTER_CANCELLED, RETRY_AFTER_CAPACITY, RETRY_AFTER_COLD_START
from state import Store
from state.fleet_store import EndedStart, FleetView
from state.writer import Writer

log = logging.getLogger(__name__)

# How many report intervals a report stays fresh (a dead follower's go stale after that).
REPORT_LIFETIMES = 3
# What a waiter's phase reads until the store shows the holder's deployment.
REQUESTED = "requested"


@dataclass
class _Waiting:
    admitted_at: datetime
    future: asyncio.Future[Route] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FollowerWaiter:
    """One request waiting, on a follower, for its model to start on the holder."""

    def __init__(self, follower: Follower, model: str, admitted_at: datetime) -> None:
        self.follower = follower
        self.model = model
        self._entry = _Waiting(admitted_at)
        self._left = False

    @property
    def phase(self) -> str:
        return self.follower.phase(self.model)

    async def wait(self) -> Route:
        follower = self.follower
        follower.pending.setdefault(self.model, []).append(self._entry)
        follower.settle(self.model)  # ready already (routes read since admission)
        timeout = follower.cold_start_timeout
        try:
            async with asyncio.timeout(timeout):
                return await self._entry.future
        except TimeoutError:
            raise unavailable(
                f"{self.model} did not become ready within {timeout:g}s.",
                code="cold_start_timeout",
                retry_after=RETRY_AFTER_COLD_START,
            ) from None
        finally:
            self.leave()

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        follower = self.follower
        entries = follower.pending.get(self.model, [])
        if self._entry in entries:
            entries.remove(self._entry)
        if not entries:
            follower.pending.pop(self.model, None)
        left = follower.waiting.get(self.model, 0) - 1
        if left > 0:
            follower.waiting[self.model] = left
        else:
            follower.waiting.pop(self.model, None)


class Follower:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        writer: Writer,
        clock: Clock,
        activity: Activity,
        gateway_id: str,
        engine_key: Callable[[str], str],
        cold_start_timeout: float,
    ) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.clock = clock
        self.activity = activity
        self.gateway_id = gateway_id
        self.engine_key = engine_key
        self.cold_start_timeout = cold_start_timeout
        # Routing here until this process holds the lease (then the controller routes; waiters
        # admitted before are still served from here).
        self.active = True
        self.waiting: dict[str, int] = {}
        self.pending: dict[str, list[_Waiting]] = {}
        self._routes: dict[str, list[Route]] = {}
        self._model_of: dict[str, str] = {}  # deployment id -> model
        self._starting: dict[str, str] = {}  # model -> the state of its start
        self._failures: dict[str, Failure] = {}
        self._ended: dict[str, EndedStart] = {}  # the newest start of each model that ended
        self._wake = asyncio.Event()
        self._report_now = asyncio.Event()
        self._report: Future[None] | None = None
        self._failing: set[str] = set()  # deployments the proxy could not reach since the report

    # -- what the OpenAI routes ask ----------------------------------------------------------

    def route(self, model: str) -> Route | None:
        """A ready deployment of `model`: the one with the fewest requests in flight from here."""
        routes = self._routes.get(model)
        if not routes:
            return None
        if len(routes) == 1:
            return routes[0]
        return min(routes, key=lambda r: self.activity.in_flight_of(r.deployment_id or ""))

    def failure(self, model: str) -> Failure | None:
        return self._failures.get(model)

    def starting(self, model: str) -> bool:
        return model in self._starting

    def phase(self, model: str) -> str:
        """The state of the model's start as the store has it (`requested` until it exists)."""
        return self._starting.get(model, REQUESTED)

    def admit(
        self, spec: ModelSpec, secrets: Mapping[str, str] | None = None, *, started_by: str | None = None
    ) -> FollowerWaiter:
        """Queue one more request for `spec`'s start (503 past the per-model bound). A per-request
        token is not passed on: the holder starts with its configured one."""
        model = spec.id
        if self.waiting.get(model, 0) >= self.settings.max_waiting_requests:
            raise unavailable(
                f"Too many requests are waiting for {model} to start; retry later.",
                code="queue_full",
                retry_after=RETRY_AFTER_QUEUE_FULL,
            )
        if model not in self.waiting:
            self._report_now.set()  # the holder hears of it at once
        self.waiting[model] = self.waiting.get(model, 0) + 1
        return FollowerWaiter(self, model, self.clock())

    def engine_error(self, route: Route, reason: str) -> None:
        """The proxy could not reach an engine: the holder is told (it checks the engine)."""
        if self.active and route.deployment_id is not None:
            self._failing.add(route.deployment_id)
            self._report_now.set()

    # -- the store, read ---------------------------------------------------------------------

    def wake(self) -> None:
        """Read the store now (a NOTIFY said a deployment changed)."""
        self._wake.set()

    async def refresh(self) -> None:
        now = self.clock()
        since = now - timedelta(seconds=self.settings.failed_model_ttl_seconds)
        for entries in self.pending.values():
            since = min([since, *(e.admitted_at for e in entries)])
        view = await asyncio.to_thread(self.store.fleet_view, since)
        self.apply(view, now)

    def apply(self, view: FleetView, now: datetime) -> None:
        routes: dict[str, list[Route]] = {}
        for dep in view.ready:
            route = Route(dep.model, dep.endpoint, deployment_id=dep.id, api_key=self.engine_key(dep.id))
            routes.setdefault(dep.model, []).append(route)
        self._routes, self._starting = routes, view.starting
        self._model_of = {r.deployment_id or "": m for m, rs in routes.items() for r in rs}
        self._failures = self._recent_failures(view.ended, view.resets, now)
        self._ended = {e.model: e for e in view.ended}  # oldest first: the newest wins
        for model in list(self.pending):
            self.settle(model)

    def _recent_failures(
        self, ended: list[EndedStart], resets: Mapping[str | None, datetime], now: datetime
    ) -> dict[str, Failure]:
        """Models whose newest start failed (not for lack of capacity) within the TTL, with none
        ready or starting since, and no admin reset since: the holder does not start them again
        until the TTL ends."""
        ttl = timedelta(seconds=self.settings.failed_model_ttl_seconds)
        out: dict[str, Failure] = {}
        for e in ended:  # oldest first: the newest wins
            out.pop(e.model, None)
            reset = max([at for m, at in resets.items() if m is None or m == e.model], default=None)
            if reset is not None and reset >= e.ended_at:
                continue
            if e.failed and not _no_capacity(e) and now - e.ended_at < ttl:
                out[e.model] = Failure(e.model, e.error or "", e.ended_at, deployment_id=e.id)
        return {m: f for m, f in out.items() if m not in self._routes and m not in self._starting}

    def settle(self, model: str) -> None:
        """Answer the waiters of `model`: a route once one is ready, the start's error once the
        start they waited for ended without serving."""
        entries = self.pending.get(model, [])
        ended = self._ended.get(model)
        for entry in [e for e in entries if not e.future.done()]:
            if (route := self.route(model)) is not None:
                entry.future.set_result(route)
            elif ended is not None and ended.ended_at >= entry.admitted_at and model not in self._starting:
                entry.future.set_exception(start_error(ended))

    # -- reports -----------------------------------------------------------------------------

    def report_rows(self) -> list[dict[str, Any]]:
        """This gateway's models with requests in flight or waiting, or used lately (within the
        reports' lifetime: a report the holder missed is repeated, not lost); per model, its
        deployments in flight or used lately (0 in flight)."""
        by_model, by_deployment = self.activity.local_in_flight() if self.active else ({}, {})
        lately = self.clock() - timedelta(seconds=REPORT_LIFETIMES * self.settings.fleet.report_seconds)
        used = self._used_since(lately)
        deployments: dict[str, dict[str, int]] = {}
        for dep_id in {*by_deployment, *(d for d in self._model_of if self._used_of(d, lately))}:
            if (model := self._model_of.get(dep_id)) is not None:
                deployments.setdefault(model, {})[dep_id] = by_deployment.get(dep_id, 0)
        failing: dict[str, list[str]] = {}
        for dep_id in sorted(self._failing):
            if (model := self._model_of.get(dep_id)) is not None:
                failing.setdefault(model, []).append(dep_id)
        self._failing.clear()
        rows = []
        for model in sorted({*by_model, *self.waiting, *used, *failing}):
            rows.append(
                {
                    "model": model,
                    "in_flight": by_model.get(model, 0),
                    "waiting": self.waiting.get(model, 0),
                    "deployments": json.dumps(deployments.get(model, {})),
                    "failing": json.dumps(failing.get(model, [])),
                    "last_used_at": self.activity.last_request(model),
                }
            )
        return rows

    def _used_since(self, lately: datetime) -> list[str]:
        if not self.active:
            return []
        models = {*self._routes, *self.activity.local_in_flight()[0]}
        return [m for m in models if (at := self.activity.last_request(m)) is not None and at >= lately]

    def _used_of(self, deployment_id: str, lately: datetime) -> bool:
        at = self.activity.last_request_of(deployment_id)
        return self.active and at is not None and at >= lately

    def report(self, urgent: bool) -> bool:
        """Hand the report to the writer; False if the previous one is not written yet."""
        if self._report is not None and not self._report.done():
            return False
        rows = self.report_rows()  # written even when empty: the report says this gateway lives
        self._report = self.writer.submit(
            self.store.write_reports, self.gateway_id, rows, at=self.clock(), urgent=urgent
        )
        return True

    # -- loops -------------------------------------------------------------------------------

    async def run_refresh(self) -> None:
        poll = self.settings.fleet.poll_seconds
        while True:
            await wait_or_timeout(self._wake, poll)
            self._wake.clear()
            if not self.active and not self.pending:
                continue  # the controller routes: only waiters admitted before are served here
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("fleet: reading the deployments failed: %s: %s", type(exc).__name__, exc)

    async def run_reports(self) -> None:
        interval = self.settings.fleet.report_seconds
        urgent = False
        while True:
            await wait_or_timeout(self._report_now, interval)
            urgent = urgent or self._report_now.is_set()
            self._report_now.clear()
            if not self.active and not self.waiting:
                continue
            if self.report(urgent):
                urgent = False

    async def close(self) -> None:
        """Take this gateway's reports away (it serves nothing more)."""
        await self.writer.run(self.store.delete_reports, self.gateway_id)


def _no_capacity(ended: EndedStart) -> bool:
    return (ended.error or "").startswith("no capacity")


def start_error(ended: EndedStart) -> GatewayError:
    """What a waiter is told of a start that ended without serving: the holder's own answers."""
    model, error = ended.model, ended.error or ""
    if not ended.failed:
        return unavailable(
            f"The start of {model} was cancelled; retry later.",
            code="start_cancelled",
            retry_after=RETRY_AFTER_CANCELLED,
        )
    if _no_capacity(ended):
        return unavailable(
            f"No GPU capacity for {model}: {error.removeprefix('no capacity: ')}",
            code="capacity_unavailable",
            retry_after=RETRY_AFTER_CAPACITY,
        )
    if error.startswith("not ready after"):
        return unavailable(
            f"{model} did not become ready in time ({error}).",
            code="cold_start_timeout",
            retry_after=RETRY_AFTER_COLD_START,
        )
    return bad_gateway(
        f"The engine for {model} failed to start (deployment {ended.id}); "
        "an admin can see why in /admin/failures.",
        code="engine_start_failed",
    )


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set, or `seconds` passed. Not `asyncio.wait_for`: on Python 3.11 it
    swallows a cancellation that comes as its inner wait ends, and the loops that call this ran on
    after their gateway cancelled them: its shutdown waited for them forever (a hang seen in CI)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
