"""Event-loop lag: how late a periodic wake-up runs.

A task asks to wake up every `interval` seconds and records, in `llmgw_event_loop_lag_seconds`,
how much later than asked it actually ran. Whatever held the loop meanwhile (a synchronous
database call, a big JSON document, a thread holding the GIL) delayed every request by as much.
Measured with `time.perf_counter()`: uvloop's own clock has millisecond resolution.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Histogram

LAG_INTERVAL_SECONDS = 0.1


async def watch_loop_lag(histogram: Histogram, interval: float = LAG_INTERVAL_SECONDS) -> None:
    """Run until cancelled, one observation per wake-up."""
    while True:
        due = time.perf_counter() + interval
        await asyncio.sleep(interval)
        histogram.observe(max(time.perf_counter() - due, 0.0))
