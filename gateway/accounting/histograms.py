"""Labelled histograms that cost the garbage collector three objects per series.

prometheus_client's `Histogram` keeps every bucket of every series as a value object with a lock
of its own: with 1,000 models and three per-model histograms that is ~77,000 objects (61% of
everything the collector tracked after startup), and a full collection of them held the event
loop for ~50 ms. Here one series is a list of bucket counts and its sum. The text they make is
prometheus_client's own (families of its `Metric` class, written by `generate_latest`; a test
compares it with a `Histogram` fed the same observations byte for byte).

Observations come from the event loop's thread; a scrape reads the counts as they are (one
series' buckets, count and sum may then be one observation apart, as with prometheus_client).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

INF = float("inf")


class Series:
    """One labelled series: counts per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # a bucket holds value <= bound
        self.sum += value


class LabelledHistogram(Collector):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        if not labelnames:
            raise ValueError("a labelled histogram needs label names")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if b != INF)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], Series] = {}

    def labels(self, **labels: str) -> Series:
        """The series of these label values, created (at zero) the first time."""
        key = tuple(str(labels[n]) for n in self.labelnames)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Series(self.bounds)
        return series

    def family(self) -> Metric:
        return Metric(self.name, self.documentation, "histogram")

    def collect(self) -> Iterator[Metric]:
        yield from self.slices(len(self._series) or 1)

    def slices(self, series_per_slice: int) -> Iterator[Metric]:
        """The family, `series_per_slice` series at a time (see exposition.py)."""
        items = list(self._series.items())
        if not items:
            yield self.family()
            return
        for start in range(0, len(items), series_per_slice):
            family = self.family()
            for key, series in items[start : start + series_per_slice]:
                self._add(family, dict(zip(self.labelnames, key, strict=True)), series)
            yield family

    def _add(self, family: Metric, labels: dict[str, str], series: Series) -> None:
        total = 0
        for le, count in zip(self._le, list(series.counts), strict=True):
            total += count
            family.add_sample(self.name + "_bucket", {**labels, "le": le}, float(total))
        family.add_sample(self.name + "_count", labels, float(total))
        family.add_sample(self.name + "_sum", labels, series.sum)
