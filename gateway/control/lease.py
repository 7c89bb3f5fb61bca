"""One controller per database: a lease row in the store, renewed while the gateway runs.

A second gateway started on the same database stands by (its HTTP server does not start)
until the lease is released or expires, then takes over and reconciles. On the same host, a
holder whose process is gone is taken over at once, so a restart after a crash does not wait
for the expiry. The lease is a plain conditional UPDATE, so it works on any SQL database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable
from datetime import timedelta

from gateway.clock import Clock
from state import Store
from tasks.procs import start_time

log = logging.getLogger(__name__)


def holder_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{start_time(pid)}:{secrets.token_hex(4)}"


def holder_is_dead(holder: str) -> bool:
    """True if `holder` ran on this host and its process is gone (or its pid was reused)."""
    parts = holder.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    return str(start_time(int(parts[1]))) != parts[2]


class ControllerLease:
    def __init__(self, store: Store, clock: Clock, *, seconds: float) -> None:
        self.store = store
        self.clock = clock
        self.seconds = seconds
        self.holder = holder_id()

    def try_acquire(self) -> bool:
        now = self.clock()
        current = self.store.lease()
        steal = current.holder if current is not None and holder_is_dead(current.holder) else None
        return self.store.acquire_lease(
            self.holder, now=now, until=now + timedelta(seconds=self.seconds), steal_from=steal
        )

    async def acquire(self) -> None:
        """Wait until this process holds the lease."""
        announced = False
        while not await asyncio.to_thread(self.try_acquire):
            if not announced:
                current = self.store.lease()
                log.warning(
                    "another gateway (%s) runs the control loop on this database; standing by",
                    current.holder if current else "?",
                )
                announced = True
            await asyncio.sleep(self.seconds / 3)
        log.info("controller lease acquired (%s)", self.holder)

    async def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew the lease every third of its duration. Losing it (this process stalled longer
        than the lease and another gateway took over) calls `on_lost`: two control loops must
        never run on one database."""
        while True:
            await asyncio.sleep(self.seconds / 3)
            if not await asyncio.to_thread(self.try_acquire):
                log.critical("controller lease lost to another gateway: this gateway stops")
                on_lost()
                return

    def release(self) -> None:
        self.store.release_lease(self.holder)


def stop_this_process() -> None:
    """Graceful shutdown through the server's own SIGTERM handling."""
    os.kill(os.getpid(), signal.SIGTERM)
