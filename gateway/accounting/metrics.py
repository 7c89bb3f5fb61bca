"""Prometheus metrics, in a registry of the app's own (never the global one).

Request metrics are updated on the request path (a counter increment and two histogram
observations, microseconds); state gauges and cost totals are computed when /metrics is
scraped, by a collector that reads the controller and the cost ledger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Latency buckets in seconds: sub-millisecond for the gateway's own overhead, minutes for LLMs.
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COLD_START_BUCKETS = (1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llmgw_requests",
            "Requests by model, endpoint and HTTP status.",
            ["model", "path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmgw_request_duration_seconds",
            "Whole request time as the client sees it (to the last byte).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "llmgw_gateway_overhead_seconds",
            "Time the gateway itself adds to a request routed to a ready engine: parsing, routing and "
            "proxying, i.e. the request time minus the time spent waiting for the engine.",
            ["model"],
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.cold_start = Histogram(
            "llmgw_cold_start_seconds",
            "Cold start duration by phase (launching, loading, total).",
            ["model", "phase"],
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "llmgw_tokens",
            "Tokens reported by the engines, by kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class StateCollector(Collector):
    """Gauges read at scrape time: deployments by state, GPUs in use, waiting requests, cost."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Any]:
        return iter(())  # families are only known at collect time

    def collect(self) -> Iterator[Any]:
        state = self._read()
        deployments = GaugeMetricFamily("llmgw_deployments", "Live deployments by state.", labels=["state"])
        for name, count in sorted(state["deployments"].items()):
            deployments.add_metric([name], count)
        yield deployments
        yield GaugeMetricFamily(
            "llmgw_gpus_in_use", "GPUs held by live deployments.", value=state["gpus_in_use"]
        )
        waiting = GaugeMetricFamily(
            "llmgw_waiting_requests", "Requests waiting for a model's engine to start.", labels=["model"]
        )
        for model, count in sorted(state["waiting"].items()):
            waiting.add_metric([model], count)
        yield waiting
        cost = CounterMetricFamily(
            "llmgw_cost_dollars",
            "Dollars spent on GPUs by model and phase (cold, serving, idle, failed).",
            labels=["model", "phase"],
        )
        gpu_seconds = CounterMetricFamily(
            "llmgw_gpu_seconds",
            "GPU-seconds held by model and phase (cold, serving, idle, failed).",
            labels=["model", "phase"],
        )
        for (model, phase), (seconds, dollars) in sorted(state["costs"].items()):
            cost.add_metric([model, phase], dollars)
            gpu_seconds.add_metric([model, phase], seconds)
        yield cost
        yield gpu_seconds
