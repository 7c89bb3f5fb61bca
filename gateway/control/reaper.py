"""The control loop: every few seconds, ask the policies what to do and do it.

`tick(now)` is one round and is what tests call with a fake clock; `run()` loops forever and
survives any exception of one tick. Schedules (after hours, pre-warm) fire for cron instants in
(previous tick, this tick], so a slow tick never skips one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from gateway.accounting.export import export_days, finished_days, s3_client
from gateway.accounting.usage import UsageRecorder
from gateway.api.errors import GatewayError
from gateway.config.settings import Settings
from gateway.control import orphans
from gateway.control.controller import Controller
from gateway.control.policies import (
    DeploymentView,
    Schedule,
    StopAction,
    after_hours_stops,
    busy_models,
    cron_fired,
    idle_stops,
    prewarm_due,
    spare_expiries,
)
from gateway.control.slices import in_slices

log = logging.getLogger(__name__)


def schedules_of(settings: Settings) -> tuple[Schedule | None, list[Schedule]]:
    after = settings.after_hours
    after_hours = Schedule(cron=after.cron, timezone=after.timezone) if after is not None else None
    prewarm = [Schedule(cron=p.cron, timezone=p.timezone, models=tuple(p.models)) for p in settings.prewarm]
    return after_hours, prewarm


class Reaper:
    def __init__(self, controller: Controller, usage: UsageRecorder, settings: Settings) -> None:
        self.controller = controller
        self.usage = usage
        self.interval_seconds = settings.reaper_interval_seconds
        self.after_hours, self.prewarm = schedules_of(settings)
        self.export = settings.export if settings.export.bucket else None
        # Set when the loop starts, i.e. once this process holds the lease: a standby that takes
        # over does not replay the schedules that fired while it stood by.
        self.last_tick: datetime = controller.clock()
        self._background: set[asyncio.Task[object]] = set()
        self.orphan_sweep_seconds = settings.orphan_sweep_seconds
        self.last_sweep: datetime = self.last_tick  # reconcile has just listed the provider's clusters
        self._sweeping: asyncio.Task[list[str]] | None = None

    def start(self) -> asyncio.Task[None]:
        self.last_tick = self.last_sweep = self.controller.clock()
        return asyncio.create_task(self.run(), name="reaper")

    async def tick(self, now: datetime) -> list[StopAction]:
        if not self.controller.ctx.acting():  # e.g. just after a stall, before the lease is renewed
            return []
        since, self.last_tick = self.last_tick, now
        views = await self.controller.views_in_slices()
        applied = []
        after_hours = after_hours_stops(views, self.after_hours, since, now)
        if after_hours:
            log.info("after hours: stopping %d deployments", len(after_hours))
            for model in sorted({action.model for action in after_hours}):
                kind, reason = after_hours[0].kind, after_hours[0].reason
                self._spawn(self.controller.stop_model(model, kind=kind, reason=reason))
            applied.extend(after_hours)
        else:
            applied.extend(await self._idle_stops(views, now))
            await self.controller.autoscale(now)
        for model in prewarm_due(self.prewarm, since, now):
            self._spawn(self._prewarm(model))
        if self.export is not None and cron_fired(self.export.cron, "UTC", since, now):
            self._spawn(self._export(now))
        await self.controller.record_activity(since, now)
        self.controller.expire_failures(now)
        await self.controller.heartbeat_due(now, views)
        self._sweep_due(now)
        await self.controller.flush_activity()
        await self.controller.ctx.ledger.drain()
        return applied

    async def _idle_stops(self, views: list[DeploymentView], now: datetime) -> list[StopAction]:
        """Idle and expired-spare stops, a slice of deployments at a time."""
        busy = busy_models(views)
        applied = []
        async for chunk in in_slices(views):
            for action in [*idle_stops(chunk, now, busy), *spare_expiries(chunk, now)]:
                if self.controller.stop_deployment(
                    action.deployment_id, kind=action.kind, reason=action.reason, spare=action.spare
                ):
                    log.info("%s: %s (%s)", action.model, action.kind, action.reason)
                    applied.append(action)
        return applied

    async def _prewarm(self, model: str) -> None:
        spec = self.controller.catalog.resolve(model)
        if spec is None or spec.external:
            log.warning("pre-warm: %s is not a model the gateway can start", model)
            return
        log.info("pre-warm: loading %s", model)
        self.controller.store.record_event(
            kind="prewarm", model=model, message="scheduled pre-warm", at=self.controller.clock()
        )
        try:
            runner = self.controller.load(spec)
        except GatewayError as exc:  # stopping, or the lease lapsed since the tick
            log.warning("pre-warm of %s not started: %s", model, exc.message)
            return
        await asyncio.wait({runner.ready})
        if (error := runner.ready.exception()) is not None:
            log.warning("pre-warm of %s failed: %s", model, getattr(error, "message", error))

    async def _export(self, now: datetime) -> None:
        assert self.export is not None and self.export.bucket is not None
        settings = self.export
        try:
            s3 = await asyncio.to_thread(s3_client)
            results = await asyncio.to_thread(
                export_days,
                self.controller.store,
                s3,
                bucket=settings.bucket or "",
                prefix=settings.prefix,
                days=finished_days(now, settings.days_back),
            )
        except Exception as exc:  # credentials, network: the next firing tries again
            log.error("S3 export failed: %s", exc)
            return
        written = [r.key for r in results if r.written]
        self.controller.store.record_event(
            kind="export", message=f"{len(written)} of {len(results)} files written"
        )

    def _sweep_due(self, now: datetime) -> None:
        """The orphan sweep (`orphans.py`), in the background like heartbeats: a hung list or
        stop never holds the tick; one at a time."""
        if self._sweeping is not None and not self._sweeping.done():
            return
        if (now - self.last_sweep).total_seconds() < self.orphan_sweep_seconds:
            return
        self.last_sweep = now
        self._sweeping = asyncio.create_task(orphans.sweep(self.controller), name="orphan sweep")
        self._track(self._sweeping)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        self._track(asyncio.create_task(coro))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for the stops and pre-warms started by earlier ticks (for tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.controller.settle()

    async def run(self) -> None:
        try:
            while not self.controller.fenced:
                await asyncio.sleep(self.interval_seconds)
                try:
                    await self.tick(self.controller.clock())
                except Exception:
                    log.exception("reaper tick failed; continuing")
        finally:  # stopped (shutdown, lease lost): the shutdown's own sweep stops what is left
            if self._sweeping is not None:
                self._sweeping.cancel()
