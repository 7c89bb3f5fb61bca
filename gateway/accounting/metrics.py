"""Prometheus metrics, in a registry of the app's own (never the global one).

Request metrics are updated on the request path (a counter increment and two histogram
observations, microseconds); state gauges and cost totals are read when /metrics is scraped,
by a collector that reads a snapshot taken by the scrape (costs: summed by the database off
the loop and cached, see `CostTotals`).

Series that exist from startup (`Metrics.known`): the requests, tokens, waiting requests, cost
and cold-start series of the known models, at zero, so that panels show 0 rather than "no data"
before the first request, and so that Prometheus' increase() counts the first event of a
series (it ignores a series' first sample). Quantiles of latency histograms need traffic to be
defined: those series appear with the first request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.accounting.attribution import team_month_costs
from gateway.accounting.histograms import LabelledHistogram
from gateway.accounting.ledger import PHASES
from state import TERMINAL, DeploymentState, Store
from state.tables import LATENCY_BOUNDS_MS
from state.writer import Writer

# Latency buckets in seconds: sub-millisecond for the gateway's own overhead, minutes for LLMs.
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = tuple(ms / 1000 for ms in LATENCY_BOUNDS_MS)  # the usage rollups' buckets
COLD_START_BUCKETS = (1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800)
LOOP_LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
log = logging.getLogger(__name__)

T = TypeVar("T")

COLD_START_PHASES = ("launching", "loading", "total")
LIVE_STATES = tuple(s.value for s in DeploymentState if s not in TERMINAL)
PATH_OF_KIND = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}


@dataclass(frozen=True)
class KnownModel:
    id: str
    kind: str = "chat"
    launchable: bool = True  # False: an external endpoint (no cold start, no cost)


class Metrics:
    def __init__(self) -> None:
        # `_created` series (a second family per metric) are of no use to Prometheus' text format,
        # and they would stop /metrics from being written in slices (see exposition.py).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.known_models: tuple[KnownModel, ...] = ()
        self._collectors: list[Collector] = []
        self.requests = Counter(
            "llmgw_requests",
            "Requests by model, endpoint and HTTP status.",
            ["model", "path", "status"],
            registry=self.registry,
        )
        # Per-model histograms: few objects per series (histograms.py), for the garbage collector.
        self.latency = LabelledHistogram(
            "llmgw_request_duration_seconds",
            "Whole request time as the client sees it (to the last byte).",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.overhead = LabelledHistogram(
            "llmgw_gateway_overhead_seconds",
            "Time the gateway itself adds to a request routed to a ready engine: parsing, routing and "
            "proxying, i.e. the request time minus the time spent waiting for the engine.",
            ["model"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.cold_start = LabelledHistogram(
            "llmgw_cold_start_seconds",
            "Cold start duration by phase (launching, loading, total).",
            ["model", "phase"],
            buckets=COLD_START_BUCKETS,
        )
        for histogram in (self.latency, self.overhead, self.cold_start):  # in the order of collectors()
            self.registry.register(histogram)
        self.tokens = Counter(
            "llmgw_tokens",
            "Tokens reported by the engines, by kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "llmgw_event_loop_lag_seconds",
            "How late a periodic wake-up of the event loop ran: time every request waited meanwhile.",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)
        self._collectors.append(collector)

    def collectors(self) -> list[Collector]:
        """Everything the registry holds, in its order (for `exposition.render`)."""
        return [
            self.requests,
            self.latency,
            self.overhead,
            self.cold_start,
            self.tokens,
            self.loop_lag,
            *self._collectors,
        ]

    def known(self, models: Iterable[KnownModel]) -> None:
        """Create the series of these models at zero (see the module docstring)."""
        self.known_models = tuple(models)
        for m in self.known_models:
            self.requests.labels(
                model=m.id, path=PATH_OF_KIND.get(m.kind, PATH_OF_KIND["chat"]), status="200"
            )
            for kind in ("prompt", "completion"):
                self.tokens.labels(model=m.id, kind=kind)
            if m.launchable:
                for phase in COLD_START_PHASES:
                    self.cold_start.labels(model=m.id, phase=phase)


def pick_known(
    models: Iterable[KnownModel], *, last_used: dict[str, datetime], priority: dict[str, int], limit: int
) -> list[KnownModel]:
    """At most `limit` models: the most recently used first, then by priority, then by id. Every
    series costs at each scrape; a reference of 10,000 models cannot have them all."""

    def rank(m: KnownModel) -> tuple[bool, float, int, str]:
        used = last_used.get(m.id)
        return (used is None, -used.timestamp() if used else 0.0, -priority.get(m.id, 0), m.id)

    return sorted(models, key=rank)[:limit]


class Cached(Generic[T]):
    """A figure summed by the database in a job of the writer (so no row is read on the loop),
    cached for `max_age` seconds."""

    def __init__(
        self,
        compute: Callable[[datetime], T],
        initial: T,
        writer: Writer,
        clock: Callable[[], datetime],
        max_age: float = 10.0,
    ) -> None:
        self.compute = compute
        self.writer = writer
        self.clock = clock
        self.max_age = max_age
        self.value: T = initial
        self._at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None

    async def get(self) -> T:
        """The cached value, refreshed first when older than `max_age` (concurrent scrapes
        share one refresh; a failed refresh keeps the previous value)."""
        if time.monotonic() - self._at > self.max_age:
            if self._refresh is None:
                self._refresh = asyncio.create_task(self._load())
            await asyncio.shield(self._refresh)
        return self.value

    async def _load(self) -> None:
        try:
            self.value = await self.writer.run(self.compute, self.clock())
            self._at = time.monotonic()
        except Exception as exc:
            log.error("%s for /metrics: %s: %s", type(self).__name__, type(exc).__name__, exc)
        finally:
            self._refresh = None


class CostTotals(Cached[dict[tuple[str, str], tuple[float, float]]]):
    """(GPU-seconds, dollars) by (model, phase) for /metrics."""

    def __init__(self, store: Store, writer: Writer, clock: Callable[[], datetime], max_age: float = 10.0):
        super().__init__(store.cost_totals, {}, writer, clock, max_age)
        self.store = store


class TeamCosts(Cached[dict[str, float]]):
    """Dollars attributed to each team this UTC month (see attribution.py), for /metrics:
    recomputed at most once a minute (it reads the month's intervals and usage)."""

    def __init__(self, store: Store, writer: Writer, clock: Callable[[], datetime], max_age: float = 60.0):
        super().__init__(lambda now: team_month_costs(store, now), {}, writer, clock, max_age)


class StateCollector(Collector):
    """Gauges read at scrape time: deployments by state, GPUs in use, waiting requests, cost.
    `read` returns a snapshot taken on the loop; the known models' series are always there."""

    def __init__(self, read: Callable[[], dict[str, Any]], metrics: Metrics) -> None:
        self._read = read
        self._metrics = metrics

    def describe(self) -> Iterator[Any]:
        return iter(())  # families are only known at collect time

    def collect(self) -> Iterator[Any]:
        state = self._read()
        known = self._metrics.known_models
        deployments = GaugeMetricFamily("llmgw_deployments", "Live deployments by state.", labels=["state"])
        by_state = {name: 0 for name in LIVE_STATES} | state["deployments"]
        for name, count in sorted(by_state.items()):
            deployments.add_metric([name], count)
        yield deployments
        yield GaugeMetricFamily(
            "llmgw_gpus_in_use", "GPUs held by live deployments.", value=state["gpus_in_use"]
        )
        yield GaugeMetricFamily(
            "llmgw_db_writes_pending",
            "Jobs queued for the database writer (usage, last-used times, ...) and not done yet.",
            value=state["writes_pending"],
        )
        waiting = GaugeMetricFamily(
            "llmgw_waiting_requests", "Requests waiting for a model's engine to start.", labels=["model"]
        )
        for model, count in sorted(({m.id: 0 for m in known} | state["waiting"]).items()):
            waiting.add_metric([model], count)
        yield waiting
        yield from _cost_families(state["costs"], [m.id for m in known if m.launchable])
        teams = GaugeMetricFamily(
            "llmgw_team_cost_month_dollars",
            "Dollars attributed to each team of client API keys this UTC month (cold starts to the "
            "starting key's team, serving and idle time by tokens; `admin`: admin loads and pre-warms; "
            "`-`: nobody). Resets at the start of a month.",
            labels=["team"],
        )
        for team, dollars in sorted(({"-": 0.0} | state.get("team_costs", {})).items()):
            teams.add_metric([team], dollars)
        yield teams


def _cost_families(
    costs: dict[tuple[str, str], tuple[float, float]], known: list[str]
) -> Iterator[CounterMetricFamily]:
    cost = CounterMetricFamily(
        "llmgw_cost_dollars",
        "Dollars spent on GPUs by model and phase (cold, serving, idle, spare, failed).",
        labels=["model", "phase"],
    )
    gpu_seconds = CounterMetricFamily(
        "llmgw_gpu_seconds",
        "GPU-seconds held by model and phase (cold, serving, idle, spare, failed).",
        labels=["model", "phase"],
    )
    zeros = {(model, phase): (0.0, 0.0) for model in known for phase in PHASES}
    for (model, phase), (seconds, dollars) in sorted((zeros | costs).items()):
        cost.add_metric([model, phase], dollars)
        gpu_seconds.add_metric([model, phase], seconds)
    yield cost
    yield gpu_seconds
