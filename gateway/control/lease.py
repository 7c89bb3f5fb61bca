"""One controller per database: a lease row in the store, renewed while the gateway runs.

A second gateway started on the same database serves requests as a follower (gateway/fleet)
and takes the control loop over when the lease is released or expires, then reconciles. On the same host, a
holder whose process is gone is taken over at once, so a restart after a crash does not wait
for the expiry. The lease is a plain conditional UPDATE, so it works on any SQL database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

from gateway.clock import Clock
from state import Store
from tasks.procs import start_time

log = logging.getLogger(__name__)

# The share of the lease's duration this process acts on after a renewal: a margin for the
# time the renewal itself took and for clocks that differ between hosts.
VALID_SHARE = 0.8


def holder_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{start_time(pid)}:{secrets.token_hex(4)}"


def holder_is_dead(holder: str) -> bool:
    """True if `holder` ran on this host and its process is gone (or its pid was reused)."""
    parts = holder.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    return str(start_time(int(parts[1]))) != parts[2]


# Renewal retries this often after a database error, until the lease's deadline.
RENEW_RETRY_SECONDS = 1.0


class ControllerLease:
    """The lease, and this process's belief about it: `held` is true only until the moment the
    lease could have expired since the last renewal that succeeded. That is measured on the
    event loop's monotonic clock from before the renewal was sent, so neither a slow renewal nor
    a jump of the wall clock makes the belief outlive the row."""

    def __init__(self, store: Store, clock: Clock, *, seconds: float) -> None:
        self.store = store
        self.clock = clock
        self.seconds = seconds
        self.holder = holder_id()
        self._valid_until: float | None = None  # event-loop time
        self.lost = False
        # A renewal runs in a thread that cancelling `keep` does not stop: it must not write the
        # row again after `release` deleted it (the lease would stay held by a stopped gateway).
        self._write = threading.Lock()
        self._released = False

    @property
    def held(self) -> bool:
        if self.lost or self._valid_until is None:
            return False
        return asyncio.get_running_loop().time() < self._valid_until

    def try_acquire(self, *, renew: bool = False) -> bool:
        """Take the lease (free, expired, or its holder dead), or with `renew` extend it only if
        this process still holds it: a holder that wakes from a stall after another gateway
        took the lease (and maybe died, its lease expiring) has lost it, whatever the row's
        expiry says now (that one changed rows this process does not know of)."""
        with self._write:
            if self._released:
                return False
            now = self.clock()
            if renew:
                return self.store.renew_lease(self.holder, until=now + timedelta(seconds=self.seconds))
            current = self.store.lease()
            steal = current.holder if current is not None and holder_is_dead(current.holder) else None
            until = now + timedelta(seconds=self.seconds)
            return self.store.acquire_lease(self.holder, now=now, until=until, steal_from=steal)

    async def acquire(self, poll_seconds: float | None = None) -> None:
        """Wait until this process holds the lease (database errors are retried), trying every
        `poll_seconds` (default: a third of the lease)."""
        announced = False
        while not await self._try():
            if not announced:
                current = await asyncio.to_thread(self.store.lease)
                log.warning(
                    "another gateway (%s) runs the control loop on this database; following it",
                    current.holder if current else "?",
                )
                announced = True
            await asyncio.sleep(poll_seconds or self.seconds / 3)
        log.info("controller lease acquired (%s)", self.holder)

    async def try_once(self) -> bool:
        """One attempt: True if this process holds the lease now."""
        return await self._try()

    async def _try(self, *, renew: bool = False) -> bool:
        sent = asyncio.get_running_loop().time()
        try:
            acquired = await asyncio.to_thread(functools.partial(self.try_acquire, renew=renew))
        except Exception as exc:  # the database is unreachable or locked: try again later
            log.warning("controller lease: database error: %s", exc)
            return False
        if acquired:
            self._valid_until = sent + self.seconds * VALID_SHARE
        return acquired

    async def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew the lease every third of its duration; a database error is retried every
        second until the lease's deadline. Past it, or when another gateway holds it, the lease
        is lost: `on_lost` is called once (this process must stop acting at once)."""
        while True:
            await asyncio.sleep(self.seconds / 3)
            while not await self._try(renew=True):
                if not self.held or await self._taken():
                    log.critical("controller lease lost: this gateway stops acting and exits")
                    self.lost = True
                    on_lost()
                    return
                await asyncio.sleep(RENEW_RETRY_SECONDS)

    async def _taken(self) -> bool:
        try:
            current = await asyncio.to_thread(self.store.lease)
        except Exception:
            return False
        return current is not None and current.holder != self.holder

    def hand_off(self) -> None:
        """Give the lease up for another gateway to take (a blocking write: run it in a thread);
        this process may take it back later (`try_once`). It does not act from here on."""
        self._valid_until = None
        with self._write:
            if not self.lost and not self._released:
                self.store.release_lease(self.holder)

    def release(self) -> None:
        """Give the lease up for good (waits for a renewal still in flight in its thread)."""
        with self._write:
            self._released = True
            if not self.lost:
                self.store.release_lease(self.holder)


def stop_this_process() -> None:
    """Graceful shutdown through the server's own SIGTERM handling."""
    os.kill(os.getpid(), signal.SIGTERM)
