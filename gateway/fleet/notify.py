"""PostgreSQL's LISTEN/NOTIFY for the fleet: one connection of its own (psycopg's asyncio
connection, on the event loop without a thread), calling a handler per channel. The handlers
only wake a loop that polls anyway, so a lost connection costs latency, never correctness: it is
opened again after a pause, and every handler is called once it is (what was missed meanwhile)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import psycopg
from sqlalchemy.engine.url import make_url

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 2.0


def listens(database_url: str) -> bool:
    """Whether the database has NOTIFY (PostgreSQL)."""
    return make_url(database_url).get_backend_name() == "postgresql"


def conninfo(database_url: str) -> str:
    """libpq's URL for SQLAlchemy's (the driver name dropped)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    def __init__(self, database_url: str, handlers: Mapping[str, Callable[[], None]]) -> None:
        self._conninfo = conninfo(database_url)  # holds the password: never logged
        self.handlers = dict(handlers)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self._listen()
            except Exception as exc:  # the server went away, or refused us
                log.warning("fleet: LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            self.connected.clear()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
            for channel in self.handlers:
                await conn.execute(f'LISTEN "{channel}"')  # our own constant names
            self.connected.set()
            for each in self.handlers.values():
                each()
            async for note in conn.notifies():
                if (handler := self.handlers.get(note.channel)) is not None:
                    handler()
