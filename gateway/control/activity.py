"""Request accounting kept in memory: requests in flight (per model and per deployment) and
last-used times.

Updated on every request without touching the database; the reaper flushes the last-used
times to the store in batches. In a fleet, the lease holder adds what the other gateways report
(`set_remote`): their requests in flight count here like its own. A request is counted with `track()`: one `begin` and one `end`
in one `try/finally`, so no exit path (error, cancellation, client gone) can leave it counted.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime

from gateway.clock import Clock


class Activity:
    def __init__(self) -> None:
        self._in_flight: defaultdict[str, int] = defaultdict(int)  # by model
        self._by_deployment: defaultdict[str, int] = defaultdict(int)
        self._last_used: dict[str, datetime] = {}
        self._dirty: set[str] = set()
        self._idle: dict[str, asyncio.Event] = {}  # deployment id -> set when its count drops to 0
        self._last_request: dict[str, datetime] = {}  # like last_used, without touches
        # Per deployment (replica): requests sent to it, and the last begin or end of one.
        self._served: defaultdict[str, int] = defaultdict(int)
        self._last_request_of: dict[str, datetime] = {}
        # The other gateways' requests (their reports): in flight by model and by deployment,
        # and waiting for a start by model.
        self._remote: dict[str, int] = {}
        self._remote_of: dict[str, int] = {}
        self._remote_waiting: dict[str, int] = {}

    @contextmanager
    def track(self, model: str, deployment_id: str | None, clock: Clock) -> Iterator[None]:
        """Count one request in flight for as long as the block runs."""
        self.begin(model, clock(), deployment_id)
        try:
            yield
        finally:
            self.end(model, clock(), deployment_id)

    def begin(self, model: str, now: datetime, deployment_id: str | None = None) -> None:
        self._in_flight[model] += 1
        if deployment_id is not None:
            self._by_deployment[deployment_id] += 1
            self._served[deployment_id] += 1
            self._last_request_of[deployment_id] = now
        self._last_used[model] = self._last_request[model] = now
        self._dirty.add(model)

    def end(self, model: str, now: datetime, deployment_id: str | None = None) -> None:
        self._in_flight[model] -= 1
        if self._in_flight[model] == 0:
            del self._in_flight[model]
        if deployment_id is not None:
            self._last_request_of[deployment_id] = now
            self._by_deployment[deployment_id] -= 1
            if self._by_deployment[deployment_id] == 0:
                del self._by_deployment[deployment_id]
                if deployment_id in self._idle and self.in_flight_of(deployment_id) == 0:
                    self._idle.pop(deployment_id).set()
        self._last_used[model] = self._last_request[model] = now
        self._dirty.add(model)

    async def wait_idle(self, deployment_id: str, grace_seconds: float) -> bool:
        """Wait until the deployment has no request in flight; False if `grace_seconds` passed first."""
        if self.in_flight_of(deployment_id) == 0:
            return True
        event = self._idle.setdefault(deployment_id, asyncio.Event())
        try:
            async with asyncio.timeout(grace_seconds):  # not wait_for: see fleet.follower.wait_or_timeout
                await event.wait()
        except TimeoutError:
            return False
        return True

    def touch(self, model: str, now: datetime) -> None:
        self._last_used[model] = now
        self._dirty.add(model)

    def in_flight(self, model: str) -> int:
        return self._in_flight.get(model, 0) + self._remote.get(model, 0)

    def in_flight_of(self, deployment_id: str) -> int:
        return self._by_deployment.get(deployment_id, 0) + self._remote_of.get(deployment_id, 0)

    def local_in_flight(self) -> tuple[dict[str, int], dict[str, int]]:
        """This process's own requests in flight, by model and by deployment (copies, for a report)."""
        return dict(self._in_flight), dict(self._by_deployment)

    def remote_waiting(self, model: str) -> int:
        return self._remote_waiting.get(model, 0)

    def set_remote(
        self,
        in_flight: Mapping[str, int],
        by_deployment: Mapping[str, int],
        waiting: Mapping[str, int],
        last_used: Mapping[str, datetime],
        used_of: Mapping[str, datetime] | None = None,
    ) -> None:
        """What the other gateways of a fleet reported (the newest reports replace the counts;
        last-used times, of models and of deployments, only move forward)."""
        self._remote, self._remote_of = dict(in_flight), dict(by_deployment)
        self._remote_waiting = dict(waiting)
        for model, at in last_used.items():
            if (known := self._last_request.get(model)) is None or at > known:
                self._last_request[model] = at
            if (known := self._last_used.get(model)) is None or at > known:
                self._last_used[model] = at
                self._dirty.add(model)
        for deployment_id, at in (used_of or {}).items():
            if (known := self._last_request_of.get(deployment_id)) is None or at > known:
                self._last_request_of[deployment_id] = at
        for deployment_id in [d for d in self._idle if self.in_flight_of(d) == 0]:
            self._idle.pop(deployment_id).set()

    def last_request(self, model: str) -> datetime | None:
        return self._last_request.get(model)

    def served_by(self, deployment_id: str) -> int:
        """Requests sent to a deployment so far (by this process)."""
        return self._served.get(deployment_id, 0)

    def last_request_of(self, deployment_id: str) -> datetime | None:
        return self._last_request_of.get(deployment_id)

    def forget(self, deployment_id: str) -> None:
        """A deployment that ended: its per-deployment counts go (in-flight ones stay until they end)."""
        self._served.pop(deployment_id, None)
        self._last_request_of.pop(deployment_id, None)

    def last_used(self, model: str) -> datetime | None:
        return self._last_used.get(model)

    def take_dirty(self) -> dict[str, datetime]:
        """Last-used times changed since the previous call (a copy, for a batched write)."""
        batch = {m: self._last_used[m] for m in self._dirty}
        self._dirty.clear()
        return batch

    def restore(self, batch: dict[str, datetime]) -> None:
        """A batch from `take_dirty()` whose write failed: write those models again at the next
        flush (their times in memory are the batch's or newer)."""
        self._dirty.update(batch)
