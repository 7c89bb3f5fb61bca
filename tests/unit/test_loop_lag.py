"""The event-loop lag probe sees what holds the loop."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

from gateway.accounting.loop_lag import watch_loop_lag
from gateway.accounting.metrics import LOOP_LAG_BUCKETS


def counts(histogram: Histogram) -> dict[float, float]:
    [family] = list(histogram.collect())
    return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}


async def test_a_blocked_loop_shows_as_one_late_wake_up() -> None:
    histogram = Histogram("lag", "lag", buckets=LOOP_LAG_BUCKETS, registry=CollectorRegistry())
    probe = asyncio.create_task(watch_loop_lag(histogram, interval=0.01))
    await asyncio.sleep(0.1)  # a free loop: wake-ups on time (within scheduling noise)
    free = counts(histogram)
    time.sleep(0.06)  # something holds the loop for 60 ms
    await asyncio.sleep(0.05)
    probe.cancel()
    held = counts(histogram)
    assert free[float("inf")] >= 5
    late = {b: held[b] - free.get(b, 0.0) for b in held}
    assert late[0.025] < late[0.1]  # one wake-up landed between 25 and 100 ms late
    assert held[float("inf")] - held[0.025] >= 1
