"""Per-model request accounting kept in memory: requests in flight and last-used time.

Updated on every request without touching the database; the reaper flushes the last-used
times to the store in batches.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime


class Activity:
    def __init__(self) -> None:
        self._in_flight: defaultdict[str, int] = defaultdict(int)
        self._last_used: dict[str, datetime] = {}
        self._dirty: set[str] = set()

    def begin(self, model: str, now: datetime) -> None:
        self._in_flight[model] += 1
        self._last_used[model] = now
        self._dirty.add(model)

    def end(self, model: str, now: datetime) -> None:
        self._in_flight[model] -= 1
        self._last_used[model] = now
        self._dirty.add(model)

    def touch(self, model: str, now: datetime) -> None:
        self._last_used[model] = now
        self._dirty.add(model)

    def in_flight(self, model: str) -> int:
        return self._in_flight.get(model, 0)

    def last_used(self, model: str) -> datetime | None:
        return self._last_used.get(model)

    def take_dirty(self) -> dict[str, datetime]:
        """Last-used times changed since the previous call (for a batched write)."""
        batch = {m: self._last_used[m] for m in self._dirty}
        self._dirty.clear()
        return batch
