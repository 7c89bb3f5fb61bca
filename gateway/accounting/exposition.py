"""The /metrics text, produced in slices so that a scrape never holds the event loop for long.

`generate_latest` builds every sample of every family in one go: with 1,000 models that is
~70,000 samples and over a second during which no request moves. `render()` yields the same
bytes (the Prometheus text format, formatted by prometheus_client itself) a slice of about
`SLICE_SAMPLES` samples at a time, letting the loop run between slices.

A labelled metric is cut by its children (this reads prometheus_client's `_metrics`,
`_labelnames` and `_samples()`, as its own `collect()` does; `test_exposition` compares the
result with `generate_latest` byte for byte). Families of other collectors are cut by samples.
`_created` series are disabled (`Metrics` does it): they would be written after each slice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.accounting.histograms import LabelledHistogram

SLICE_SAMPLES = 100


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _labelled_slices(metric: Any) -> Iterator[Metric]:
    """The family of a labelled metric, a few children at a time."""
    with metric._lock:
        children = list(metric._metrics.items())
    family, samples = metric._get_metric(), 0
    for labels, child in children:
        series = list(zip(metric._labelnames, labels, strict=True))
        for s in child._samples():
            family.add_sample(
                metric._name + s.name,
                dict(series + list(s.labels.items())),
                s.value,
                s.timestamp,
                s.exemplar,
                s.native_histogram,
            )
            samples += 1
        if samples >= SLICE_SAMPLES:
            yield family
            family, samples = metric._get_metric(), 0
    if samples or not children:
        yield family


def _sample_slices(family: Metric) -> Iterator[Metric]:
    if len(family.samples) <= SLICE_SAMPLES:
        yield family
        return
    for start in range(0, len(family.samples), SLICE_SAMPLES):
        part = Metric(family.name, family.documentation, family.type, family.unit)
        part.samples = family.samples[start : start + SLICE_SAMPLES]
        yield part


def slices(collector: Collector) -> Iterator[Metric]:
    """A collector's families, in slices (each a family of the same name)."""
    if isinstance(collector, MetricWrapperBase) and collector._labelnames:
        yield from _labelled_slices(collector)
        return
    if isinstance(collector, LabelledHistogram):
        yield from collector.slices(max(SLICE_SAMPLES // (len(collector.bounds) + 3), 1))
        return
    for family in collector.collect():
        yield from _sample_slices(family)


async def render(collectors: Iterable[Collector]) -> bytes:
    """What `generate_latest` of a registry of these collectors (in this order) returns."""
    out: list[bytes] = []
    for collector in collectors:
        previous = None
        for family in slices(collector):
            text = generate_latest(_Families([family]))
            if family.name == previous:  # a later slice of the same family: no second header
                text = text.split(b"\n", 2)[2]
            out.append(text)
            previous = family.name
            await asyncio.sleep(0)
    return b"".join(out)
