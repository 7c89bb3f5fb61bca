"""Per-model request accounting kept in memory: requests in flight and last-used time.

Updated on every request without touching the database; the reaper flushes the last-used
times to the store in batches.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime


class Activity:
    def __init__(self) -> None:
        self._in_flight: defaultdict[str, int] = defaultdict(int)
        self._last_used: dict[str, datetime] = {}
        self._dirty: set[str] = set()
        self._idle: dict[str, asyncio.Event] = {}
        self._last_request: dict[str, datetime] = {}  # like last_used, without touches

    def begin(self, model: str, now: datetime) -> None:
        self._in_flight[model] += 1
        self._last_used[model] = self._last_request[model] = now
        self._dirty.add(model)

    def end(self, model: str, now: datetime) -> None:
        self._in_flight[model] -= 1
        self._last_used[model] = self._last_request[model] = now
        self._dirty.add(model)
        if self._in_flight[model] == 0 and model in self._idle:
            self._idle.pop(model).set()

    async def wait_idle(self, model: str, grace_seconds: float) -> bool:
        """Wait until `model` has no request in flight; False if `grace_seconds` passed first."""
        if self.in_flight(model) == 0:
            return True
        event = self._idle.setdefault(model, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), grace_seconds)
        except TimeoutError:
            return False
        return True

    def touch(self, model: str, now: datetime) -> None:
        self._last_used[model] = now
        self._dirty.add(model)

    def in_flight(self, model: str) -> int:
        return self._in_flight.get(model, 0)

    def last_request(self, model: str) -> datetime | None:
        return self._last_request.get(model)

    def last_used(self, model: str) -> datetime | None:
        return self._last_used.get(model)

    def take_dirty(self) -> dict[str, datetime]:
        """Last-used times changed since the previous call (for a batched write)."""
        batch = {m: self._last_used[m] for m in self._dirty}
        self._dirty.clear()
        return batch

    def restore(self, batch: dict[str, datetime]) -> None:
        """A batch from `take_dirty()` whose write failed: write those models again at the next
        flush (their times in memory are the batch's or newer)."""
        self._dirty.update(batch)
