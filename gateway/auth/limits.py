"""Per-key rate limits in memory: a sliding-window counter per key and unit (requests or
tokens per minute).

The count of the previous fixed minute is weighted by how much of it still lies inside the
last 60 seconds, plus the count of the current minute (the approximation Cloudflare and nginx
use): two numbers per key, no per-request list. Limits hold per gateway process.
"""

from __future__ import annotations

import math

WINDOW_SECONDS = 60.0


class SlidingWindow:
    __slots__ = ("_current", "_previous", "_start")

    def __init__(self) -> None:
        self._start = -math.inf  # start of the current fixed window (monotonic seconds)
        self._current = 0.0
        self._previous = 0.0

    def _roll(self, now: float) -> None:
        if now - self._start < WINDOW_SECONDS:
            return
        windows = (now - self._start) // WINDOW_SECONDS if self._start > -math.inf else 2
        self._previous = self._current if windows == 1 else 0.0
        self._current = 0.0
        self._start = now if windows >= 2 else self._start + WINDOW_SECONDS

    def used(self, now: float) -> float:
        """The estimated count over the last 60 seconds."""
        self._roll(now)
        weight = 1.0 - (now - self._start) / WINDOW_SECONDS
        return self._previous * weight + self._current

    def add(self, now: float, amount: float = 1.0) -> None:
        self._roll(now)
        self._current += amount

    def retry_after(self, now: float, limit: float, amount: float = 1.0) -> int:
        """Whole seconds until `amount` more fits under `limit` (0: it fits now)."""
        self._roll(now)
        elapsed = now - self._start
        if self._previous * (1.0 - elapsed / WINDOW_SECONDS) + self._current + amount <= limit:
            return 0
        room = limit - amount - self._current
        if room >= 0 and self._previous > 0:  # fits once enough of the previous window slid out
            wait = (1.0 - room / self._previous) * WINDOW_SECONDS - elapsed
            return max(1, math.ceil(wait - 1e-9))
        # Only in the next window, once enough of this one slid out.
        room_next = limit - amount
        fraction = 1.0 - room_next / self._current if self._current > 0 and room_next >= 0 else 1.0
        return max(1, math.ceil(WINDOW_SECONDS - elapsed + fraction * WINDOW_SECONDS - 1e-9))
