"""The lease holder's side of the fleet: the other gateways' reports.

Every `fleet.poll_seconds` (and at once on PostgreSQL's NOTIFY) the holder reads the reports
written within the last few report intervals (older ones are of gateways gone quiet, which must
not keep a model hot forever). Their requests in flight and last-used times go into the
controller's `Activity`, where idle teardown, drains and the autoscaler see them like the
holder's own; waiting requests for a model with nothing ready or starting are a launch request:
the controller starts it as it would for its own first request (single flight, capacity,
takeover by priority), unless its start failed recently.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from gateway.api.errors import GatewayError
from gateway.control.controller import Controller
from gateway.control.fleet import Route
from gateway.fleet.follower import REPORT_LIFETIMES, wait_or_timeout
from state.tables import GatewayReport

log = logging.getLogger(__name__)


class LaunchRequests:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Read the reports now (a NOTIFY said a model got waiting requests)."""
        self._wake.set()

    async def run(self) -> None:
        poll = self.controller.settings.fleet.poll_seconds
        while not self.controller.fenced:
            await wait_or_timeout(self._wake, poll)
            self._wake.clear()
            try:
                await self.tick(self.controller.clock())
            except Exception as exc:
                log.warning("fleet: reading the reports failed: %s: %s", type(exc).__name__, exc)

    async def tick(self, now: datetime) -> list[str]:
        """Read the fresh reports and act on them; the models whose start was requested."""
        if not self.controller.ctx.acting():
            return []
        fresh = timedelta(seconds=REPORT_LIFETIMES * self.controller.settings.fleet.report_seconds)
        reports = await asyncio.to_thread(self.controller.store.fresh_reports, now - fresh)
        return self.apply(reports)

    def apply(self, reports: Iterable[GatewayReport]) -> list[str]:
        reports = list(reports)
        in_flight: dict[str, int] = {}
        by_deployment: dict[str, int] = {}
        waiting: dict[str, int] = {}
        last_used: dict[str, datetime] = {}
        used_of: dict[str, datetime] = {}  # by deployment: its model's last request there
        for r in reports:
            in_flight[r.model] = in_flight.get(r.model, 0) + r.in_flight
            waiting[r.model] = waiting.get(r.model, 0) + r.waiting
            at = r.last_used_at
            for dep_id, n in json.loads(r.deployments or "{}").items():
                by_deployment[dep_id] = by_deployment.get(dep_id, 0) + int(n)
                if at is not None:
                    used_of[dep_id] = max(at, used_of.get(dep_id, at))
            if at is not None:
                last_used[r.model] = max(at, last_used.get(r.model, at))
        self.controller.activity.set_remote(in_flight, by_deployment, waiting, last_used, used_of)
        self._check_failing(reports)
        return [m for m, n in sorted(waiting.items()) if n > 0 and self._launch(m)]

    def _check_failing(self, reports: Iterable[GatewayReport]) -> None:
        """Engines another gateway could not reach: checked as if this one had failed to (the
        runner probes its engine and stops it as failed if it is gone)."""
        for r in reports:
            for dep_id in json.loads(r.failing or "[]"):
                route = Route(model=r.model, base_url="", deployment_id=str(dep_id))
                self.controller.engine_error(route, f"unreachable from gateway {r.gateway_id}")

    def _launch(self, model: str) -> bool:
        controller = self.controller
        spec = controller.catalog.resolve(model)
        if spec is None or spec.external or controller.closing:
            return False
        if controller.failure(model) is not None or controller.route(model) is not None:
            return False
        if controller.starting(model):
            return False
        log.info("fleet: %s requested by another gateway", model)
        try:
            controller.load(spec, started_by=None)
        except GatewayError as exc:  # stopping
            log.info("fleet: %s not started: %s", model, exc.message)
            return False
        return True
