"""The real gateway application holding many live deployments whose engines all answer from one
stub upstream: `FakeProvider` (the Provider protocol's fake) "launches" them, everything else is
the real gateway (controller, reaper ticks, ledger, usage, SQLite store, uvicorn on uvloop).

It adds one route for the benchmark, `GET /bench/loop-lag`: the lag samples of its own wake-up
probe (every 100 ms, like the gateway's histogram), each with its `time.monotonic()` so the
benchmark can cut them into its measurement windows (CLOCK_MONOTONIC is the same in every process).
It works with any version of the gateway that has `create_app(settings, provider)`, so a "before"
figure can be measured on an older commit.

Run: python -m bench.fleet_gateway --config gateway.yaml --endpoint http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from gateway.app import create_app
from gateway.config.settings import load_settings
from tests.fakes import FakeProvider

PROBE_SECONDS = 0.1


class LagProbe:
    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (monotonic time of the wake-up, lag in seconds)

    async def run(self) -> None:
        while True:
            due = time.perf_counter() + PROBE_SECONDS
            await asyncio.sleep(PROBE_SECONDS)
            lag = max(time.perf_counter() - due, 0.0)
            self.samples.append((time.monotonic(), lag))

    async def report(self) -> dict[str, Any]:
        return {"samples": self.samples}


async def serve(config: uvicorn.Config, probe: LagProbe) -> None:
    task = asyncio.create_task(probe.run())
    try:
        await uvicorn.Server(config).serve()
    finally:
        task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--endpoint", required=True, help="where every deployment's engine answers")
    args = parser.parse_args()
    settings = load_settings(args.config)
    app = create_app(settings, provider=FakeProvider(endpoint=args.endpoint))
    probe = LagProbe()
    app.add_api_route("/bench/loop-lag", probe.report, methods=["GET"], include_in_schema=False)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # as `llm-gateway serve` runs it
        lifespan="on",
    )
    uvloop.run(serve(config, probe))


if __name__ == "__main__":
    main()
