"""The control loop: every few seconds, ask the policies what to do and do it.

`tick(now)` is one round and is what tests call with a fake clock; `run()` loops forever and
survives any exception of one tick."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from gateway.controller import Controller
from gateway.policies import StopAction, idle_stops
from gateway.usage import UsageRecorder

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, controller: Controller, usage: UsageRecorder, *, interval_seconds: float) -> None:
        self.controller = controller
        self.usage = usage
        self.interval_seconds = interval_seconds

    async def tick(self, now: datetime) -> list[StopAction]:
        actions = idle_stops(self.controller.views(), now)
        applied = []
        for action in actions:
            if self.controller.stop_soon(action.model, kind=action.kind, reason=action.reason) is not None:
                log.info("%s: %s (%s)", action.model, action.kind, action.reason)
                applied.append(action)
        await self.controller.heartbeat_due(now)
        await asyncio.to_thread(self.controller.flush_activity)
        await self.usage.flush()
        return applied

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.tick(self.controller.clock())
            except Exception:
                log.exception("reaper tick failed; continuing")
