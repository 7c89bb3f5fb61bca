"""Load patterns on top of `http_client`: interleaved one-at-a-time rounds, a closed loop at fixed
concurrency, and a burst of simultaneous requests. All bounded in count and in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.http_client import Client, Reply


@dataclass
class Series:
    """Replies of one target in an interleaved run."""

    replies: list[Reply] = field(default_factory=list)
    errors: int = 0

    def latencies(self) -> list[float]:
        return [r.latency for r in self.replies]


async def interleaved(
    requests: Mapping[str, tuple[str, bytes]],
    *,
    rounds: int,
    time_limit: float,
    stream: bool = False,
    warmup: int = 20,
    pause: float = 0.0,
) -> dict[str, Series]:
    """One request at a time. Each round sends one request to every target (`name -> (url,
    request bytes)`), rotating the order every round so that no target always goes first; machine
    noise then hits all targets alike. `pause`: seconds of silence before each request. Stops
    after `rounds` or `time_limit` seconds."""
    names = list(requests)
    clients = {name: Client(url) for name, (url, _) in requests.items()}
    series = {name: Series() for name in names}
    try:
        for _ in range(warmup):
            for name in names:
                await clients[name].send(requests[name][1], stream=stream)
        deadline = time.monotonic() + time_limit
        for n in range(rounds):
            if time.monotonic() > deadline:
                break
            shift = n % len(names)
            for name in names[shift:] + names[:shift]:
                if pause:
                    await asyncio.sleep(pause)
                try:
                    reply = await clients[name].send(requests[name][1], stream=stream)
                except (OSError, TimeoutError):
                    series[name].errors += 1
                    clients[name].close()
                    continue
                if reply.status == 200:
                    series[name].replies.append(reply)
                else:
                    series[name].errors += 1
    finally:
        for client in clients.values():
            client.close()
    return series


@dataclass
class LoadResult:
    connections: int
    seconds: float
    completed: int
    errors: int
    latencies: list[float]

    @property
    def rps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


async def closed_loop(
    url: str, request: bytes, *, connections: int, seconds: float, warmup_seconds: float = 0.5
) -> LoadResult:
    """`connections` clients each send a request as soon as their previous one is answered.
    Requests answered during the `seconds` after the warm-up are counted."""
    start = time.perf_counter() + warmup_seconds
    end = start + seconds
    latencies: list[float] = []
    counts = {"completed": 0, "errors": 0}

    async def worker() -> None:
        client = Client(url)
        try:
            while time.perf_counter() < end:
                try:
                    reply = await client.send(request, timeout=30)
                except (OSError, TimeoutError):
                    client.close()
                    if reply_counted(time.perf_counter()):
                        counts["errors"] += 1
                    await asyncio.sleep(0.01)
                    continue
                if reply_counted(reply.ended):
                    if reply.status == 200:
                        counts["completed"] += 1
                        latencies.append(reply.latency)
                    else:
                        counts["errors"] += 1
        finally:
            client.close()

    def reply_counted(at: float) -> bool:
        return start <= at < end

    await asyncio.gather(*(worker() for _ in range(connections)))
    return LoadResult(connections, seconds, counts["completed"], counts["errors"], latencies)


async def burst(url: str, request: bytes, *, n: int, timeout: float) -> list[Reply | BaseException]:
    """`n` requests at once, each on its own new connection; all answers (or exceptions)."""

    async def one() -> Reply:
        client = Client(url)
        try:
            return await client.send(request, timeout=timeout)
        finally:
            client.close()

    return list(await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True))
