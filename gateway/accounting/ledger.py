"""The cost ledger: who held which GPUs, in which phase, at what price.

The controller reports state changes; the reaper reports, once per tick, whether each ready
deployment served traffic (serving) or not (idle). Intervals are written only when the phase
changes, never per request. A takeover closes the victim's interval and opens the new
model's at the moment of the swap, on the same cluster and price.

The ledger decides on the event loop (its view of open intervals is in memory) and never writes
there: its writes go, in order, to the database writer's thread (`_Outbox`). A write that fails
(the database is locked or down) stays first in line and is sent again at the next change or
tick, so nothing is lost or reordered while the process lives; `drain()` waits for what is queued.
Writes are sent only while this process holds the controller lease: a gateway that wakes from a
stall must not write its stale view over the new holder's ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from state import DeploymentState, Store
from state.store import IntervalChange
from state.writer import Writer
from tasks.provider import ClusterRef

log = logging.getLogger(__name__)

S = DeploymentState

# The phase a deployment's GPUs are billed under, by deployment state (None: nothing held yet).
PHASE_OF_STATE: dict[DeploymentState, str | None] = {
    S.PENDING: None,
    S.LAUNCHING: "cold",
    S.LOADING: "cold",
    S.READY: "idle",  # until the reaper sees traffic
    S.DRAINING: "serving",  # finishing requests in flight
    S.SPARE: "spare",  # kept up after its keep-hot time for another cold start: priced like idle
    S.STOPPING: None,  # stays in the phase it was in until the engine is gone
}
PHASES = ("cold", "serving", "idle", "spare", "failed")


class PriceBook:
    """Hourly price of a cluster: what the provider reported for the launched resources, else
    the configured price per GPU-hour of its accelerator, else the default."""

    def __init__(self, *, per_gpu_hour: Mapping[str, float], default_gpu_hour: float) -> None:
        self.per_gpu_hour = dict(per_gpu_hour)
        self.default_gpu_hour = default_gpu_hour

    def hourly(self, ref: ClusterRef | None, gpus: int, accelerators: tuple[str, ...] = ()) -> float:
        if ref is not None and ref.data.get("hourly_price") is not None:
            return float(ref.data["hourly_price"])
        names = tuple((ref.data.get("accelerators") or {}) if ref is not None else ()) or accelerators
        known = [self.per_gpu_hour[n] for n in names if n in self.per_gpu_hour]
        return (min(known) if known else self.default_gpu_hour) * gpus


Write = tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]]


class _Outbox:
    """Ledger writes, in order, through the writer: one batch in flight at a time; a batch's
    writes that did not happen (a database error) go back to the front of the line."""

    def __init__(self, writer: Writer, acting: Callable[[], bool]) -> None:
        self.writer = writer
        self._acting = acting
        self._queue: list[Write] = []
        self._in_flight: asyncio.Future[None] | None = None

    def put(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self._queue.append((fn, args, kwargs))
        self.send()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def send(self) -> None:
        if self._in_flight is not None or not self._queue or not self._acting():
            return
        batch, self._queue = self._queue, []
        done: list[int] = [0]  # how many of the batch were written (set by the writer's thread)
        future = asyncio.get_running_loop().create_future()
        self._in_flight = future
        job = self.writer.submit(_apply, batch, done)
        job.add_done_callback(lambda f: future.get_loop().call_soon_threadsafe(self._sent, batch, done, f))

    def _sent(self, batch: list[Write], done: list[int], job: Future[None]) -> None:
        future, self._in_flight = self._in_flight, None
        if job.exception() is not None:
            self._queue[:0] = batch[done[0] :]  # retried first, at the next send
        if future is not None and not future.done():
            future.set_result(None)
        if job.exception() is None:
            self.send()

    async def drain(self) -> bool:
        """Send what is queued and wait for it; True if everything queued is written."""
        self.send()
        while self._in_flight is not None:
            await asyncio.shield(self._in_flight)
            if self._queue and self._in_flight is None:
                return False  # a write failed: it waits for the next send
        return not self._queue


def _apply(batch: list[Write], done: list[int]) -> None:
    """On the writer's thread: each write in turn; `done` counts those that happened."""
    for fn, args, kwargs in batch:
        fn(*args, **kwargs)
        done[0] += 1


class Ledger:
    def __init__(
        self,
        store: Store,
        prices: PriceBook,
        *,
        provider: str,
        writer: Writer,
        acting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.prices = prices
        self.provider = provider
        self._outbox = _Outbox(writer, acting)
        self._phase: dict[str, str] = {}  # deployment id -> phase of its open interval
        self._price: dict[str, tuple[str | None, int, float]] = {}  # deployment id -> cluster, gpus, price
        self._start: dict[str, datetime] = {}  # deployment id -> start of its open interval
        self._was_ready: set[str] = set()  # a failure after ready is not a failed launch

    def held(self, deployment_id: str, *, cluster: str | None, gpus: int, hourly_price: float) -> None:
        """The deployment now holds this cluster (launch returned, or a takeover): re-price its open interval."""
        self._price[deployment_id] = (cluster, gpus, hourly_price)
        self._outbox.put(
            self.store.update_open_interval,
            deployment_id,
            cluster=cluster,
            gpus=gpus,
            hourly_price=hourly_price,
        )

    def state(self, deployment_id: str, model: str, new: DeploymentState, at: datetime) -> None:
        if new is S.FAILED:
            relabel = None if deployment_id in self._was_ready else {"cold": "failed"}
            self._outbox.put(self.store.close_interval, deployment_id, at=at, relabel=relabel)
            self._forget(deployment_id)
        elif new is S.STOPPED:
            self._outbox.put(self.store.close_interval, deployment_id, at=at)
            self._forget(deployment_id)
        else:
            if new is S.READY:
                self._was_ready.add(deployment_id)
            phase = PHASE_OF_STATE[new]
            if phase is not None:
                self._enter(deployment_id, model, phase, at)

    def activity(self, windows: Iterable[tuple[str, str, bool]], *, since: datetime) -> None:
        """Once per tick, for each ready deployment (id, model, served traffic?): label the window
        that began at `since` (the previous tick) serving or idle. The window is labelled from its
        start, so a request between two ticks is billed as serving from the first of them. All
        phase changes of a tick are written in one transaction."""
        changes = []
        for deployment_id, model, serving in windows:
            if self._phase.get(deployment_id) in ("serving", "idle"):
                start = self._start.get(deployment_id, since)
                change = self._plan(deployment_id, model, "serving" if serving else "idle", max(since, start))
                if change is not None:
                    changes.append(change)
        if changes:
            self._outbox.put(self.store.change_intervals, changes)

    def checked(self, at: datetime) -> None:
        """Every open interval was still open at `at` (what a restart bills up to)."""
        self._outbox.put(self.store.check_open_intervals, at)

    def discard(self, deployment_id: str) -> None:
        """Nothing was ever held (no capacity): the deployment costs nothing."""
        self._outbox.put(self.store.delete_intervals, deployment_id)
        self._forget(deployment_id)

    async def drain(self) -> bool:
        """Wait until the queued writes are written; False if one failed (it stays queued)."""
        return await self._outbox.drain()

    @property
    def pending(self) -> int:
        return self._outbox.pending

    def restart(
        self, deployment_id: str, phase: str, started: datetime, cluster: str | None, gpus: int, price: float
    ) -> None:
        """Resume the ledger of a deployment adopted after a gateway restart."""
        self._phase[deployment_id] = phase
        self._start[deployment_id] = started
        if phase in ("serving", "idle", "spare"):
            self._was_ready.add(deployment_id)
        self._price[deployment_id] = (cluster, gpus, price)

    def _enter(self, deployment_id: str, model: str, phase: str, at: datetime) -> None:
        change = self._plan(deployment_id, model, phase, at)
        if change is not None:
            self._outbox.put(self.store.change_intervals, [change])

    def _plan(self, deployment_id: str, model: str, phase: str, at: datetime) -> IntervalChange | None:
        """Update the in-memory view and say what the store must do (None: nothing)."""
        if self._phase.get(deployment_id) == phase:
            return None
        if deployment_id in self._phase and self._start.get(deployment_id) == at:
            # The open interval has not lasted a moment: relabel it rather than leave a 0-second one.
            self._phase[deployment_id] = phase
            return IntervalChange(deployment_id=deployment_id, relabel=phase)
        cluster, gpus, price = self._price.get(deployment_id, (None, 0, 0.0))
        self._phase[deployment_id] = phase
        self._start[deployment_id] = at
        row = {
            "deployment_id": deployment_id,
            "model": model,
            "cluster": cluster,
            "provider": self.provider,
            "phase": phase,
            "gpus": gpus,
            "hourly_price": price,
            "started_at": at,
            "ended_at": None,
            "checked_at": at,
        }
        return IntervalChange(deployment_id=deployment_id, open=row)

    def _forget(self, deployment_id: str) -> None:
        self._phase.pop(deployment_id, None)
        self._price.pop(deployment_id, None)
        self._start.pop(deployment_id, None)
        self._was_ready.discard(deployment_id)
