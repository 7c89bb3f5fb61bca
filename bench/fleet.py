"""A gateway process with a reference of many models and many live deployments in its store
(see `bench/fleet_gateway.py`), for benchmarks of what users feel at that scale."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.gateway_proc import ADMIN_TOKEN, Gateway
from bench.procs import HOST, free_port, start_server
from bench.suite import log

# Loads in flight while the deployments are created (the admin API waits for each to be ready).
SEED_CONCURRENCY = 8


def reference(models: int, first: str) -> dict[str, Any]:
    """`models` entries: `first`, then org/model-00001, ..."""
    names = [first] + [f"org/model-{i:05d}" for i in range(1, models)]
    return {name: {} for name in names}


def start_fleet_gateway(
    workdir: Path, endpoint: str, *, models: dict[str, Any], live: list[str], **settings: Any
) -> Gateway:
    """Start the gateway with `models` as its reference file and FakeProvider engines answering
    at `endpoint`, then load the `live` models (each becomes a ready deployment)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ref = workdir / "model_reference.json"
    ref.write_text(json.dumps(models))
    data = workdir / "data"
    config: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "admin_token": ADMIN_TOKEN,
        "client_auth": "open",  # the load generators carry no API key
        "after_hours": None,
        "keep_hot_seconds": 86_400,  # the deployments stay up for the whole run
        "data_dir": str(data),
        "model_reference": str(ref),
        "log_level": "WARNING",
        **settings,
    }
    config_file = workdir / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    argv = [sys.executable, "-m", "bench.fleet_gateway", "--config", str(config_file), "--endpoint", endpoint]
    server = start_server("gateway", argv, port=port, log=workdir / "gateway.log", env=env, timeout=300)
    gateway = Gateway(server, f"sqlite:///{data / 'gateway.db'}")
    try:
        t0 = time.monotonic()
        asyncio.run(_load_all(gateway.base_url, live))
        log.info("%d deployments ready in %.1f s", len(live), time.monotonic() - t0)
    except BaseException:
        gateway.stop()
        raise
    return gateway


async def _load_all(base_url: str, models: list[str]) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    queue = list(reversed(models))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            model = queue.pop()
            r = await client.post(f"/admin/models/{model}/load", params={"wait": "true"}, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"load {model}: {r.status_code} {r.text[:200]}")

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(SEED_CONCURRENCY)))


def loop_lag_samples(gateway: Gateway) -> list[tuple[float, float]]:
    """The fleet gateway's own probe: (monotonic time, lag seconds) of every wake-up so far."""
    r = httpx.get(gateway.base_url + "/bench/loop-lag", timeout=30)
    r.raise_for_status()
    return [(float(t), float(lag)) for t, lag in r.json()["samples"]]
