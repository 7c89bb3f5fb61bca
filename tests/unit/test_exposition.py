"""/metrics written in slices is byte for byte what prometheus_client writes in one go."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import generate_latest

from gateway.accounting import exposition
from gateway.accounting.metrics import KnownModel, Metrics, StateCollector


def busy_metrics(models: int) -> Metrics:
    metrics = Metrics()
    metrics.known([KnownModel(f"org/model-{i}", launchable=i % 2 == 0) for i in range(models)])
    for i in range(models):
        m = f"org/model-{i}"
        metrics.requests.labels(model=m, path="/v1/chat/completions", status="200").inc(i)
        metrics.latency.labels(model=m).observe(i / 100)
        metrics.cold_start.labels(model=m, phase="total").observe(i)
    metrics.loop_lag.observe(0.0003)
    state: dict[str, Any] = {
        "deployments": {"ready": models},
        "gpus_in_use": models,
        "waiting": {"org/model-1": 3},
        "costs": {(f"org/model-{i}", "idle"): (i * 1.5, i / 7) for i in range(models)},
        "writes_pending": 2,
    }
    metrics.add_collector(StateCollector(lambda: state, metrics))
    return metrics


async def test_slices_add_up_to_generate_latest() -> None:
    for models in (0, 1, 7, 300):
        metrics = busy_metrics(models)
        assert await exposition.render(metrics.collectors()) == generate_latest(metrics.registry), models


async def test_the_loop_runs_between_slices() -> None:
    metrics = busy_metrics(300)
    turns = 0

    async def count() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    text = await exposition.render(metrics.collectors())
    counter.cancel()
    samples = text.count(b"\n") - text.count(b"\n#")
    assert samples > 15_000
    assert turns >= samples // exposition.SLICE_SAMPLES  # at least one turn per slice
