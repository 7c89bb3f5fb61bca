"""The lean labelled histogram writes what prometheus_client's Histogram writes, byte for byte,
and holds a few objects per series."""

from __future__ import annotations

import gc
import random
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest

from gateway.accounting.histograms import LabelledHistogram
from gateway.accounting.metrics import COLD_START_BUCKETS, LATENCY_BUCKETS, OVERHEAD_BUCKETS

NAME, DOC = "llmgw_test_seconds", "A test histogram."


def pair(
    buckets: tuple[float, ...],
) -> tuple[CollectorRegistry, Histogram, CollectorRegistry, LabelledHistogram]:
    disable_created_metrics()  # type: ignore[no-untyped-call]  # as Metrics does
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(NAME, DOC, ["model", "phase"], buckets=buckets, registry=theirs)
    lean = LabelledHistogram(NAME, DOC, ["model", "phase"], buckets=buckets)
    ours.register(lean)
    return theirs, reference, ours, lean


def test_the_same_text_as_prometheus_client() -> None:
    rng = random.Random(7)
    for buckets in (LATENCY_BUCKETS, OVERHEAD_BUCKETS, COLD_START_BUCKETS):
        theirs, reference, ours, lean = pair(buckets)
        assert generate_latest(ours) == generate_latest(theirs)  # no series yet
        lean.labels(model="never", phase="total")  # a series at zero
        reference.labels(model="never", phase="total")
        for _ in range(2_000):
            labels = {"model": f"org/m-{rng.randrange(20)}", "phase": rng.choice(["loading", "total"])}
            # values on the bounds too: a bucket holds what is <= its bound
            value = rng.choice([rng.uniform(0, 2 * buckets[-1]), rng.choice(buckets), 0.0])
            lean.labels(**labels).observe(value)
            reference.labels(**labels).observe(value)
        assert generate_latest(ours) == generate_latest(theirs)


def test_slices_hold_every_series_once() -> None:
    _, _, _, lean = pair(OVERHEAD_BUCKETS)
    for i in range(25):
        lean.labels(model=f"m{i}", phase="total").observe(i / 1000)
    parts = list(lean.slices(4))
    assert len(parts) == 7
    counts = [s for part in parts for s in part.samples if s.name == NAME + "_count"]
    assert sorted(s.labels["model"] for s in counts) == sorted(f"m{i}" for i in range(25))


def test_a_series_is_a_few_objects() -> None:
    _, reference, _, lean = pair(LATENCY_BUCKETS)

    def tracked_by(add: Callable[[int], None]) -> int:
        gc.collect()
        gc.disable()  # no collection between the two counts
        try:
            before = len(gc.get_objects())
            for i in range(100):
                add(i)
            return len(gc.get_objects()) - before
        finally:
            gc.enable()

    ours = tracked_by(lambda i: lean.labels(model=f"m{i}", phase="total").observe(0.1))
    theirs = tracked_by(lambda i: reference.labels(model=f"m{i}", phase="total").observe(0.1))
    assert ours <= 4 * 100 and theirs > 5 * ours, (ours, theirs)
