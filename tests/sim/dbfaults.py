"""Database errors for one simulated gateway: a SQLAlchemy hook on its store's engine.

`before_cursor_execute` raises the driver's own `sqlite3.OperationalError` ("database is
locked"), which SQLAlchemy wraps into `sqlalchemy.exc.OperationalError` exactly as it does for a
real busy timeout. Test harness only: product code is not touched.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event


class DbFaults:
    def __init__(self, engine: Engine, now: Callable[[], float], on_fault: Callable[[str], None]) -> None:
        self.engine = engine
        self.now = now
        self.on_fault = on_fault
        self.fail_next = 0  # the next N statements fail
        self.fail_until = -math.inf  # every statement fails until then
        self.failed = 0
        event.listen(engine, "before_cursor_execute", self._hook)

    def burst(self, statements: int) -> None:
        self.fail_next += statements

    def window(self, seconds: float) -> None:
        self.fail_until = max(self.fail_until, self.now() + seconds)

    def clear(self) -> None:
        self.fail_next = 0
        self.fail_until = -math.inf

    def _hook(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if self.fail_next <= 0 and self.now() >= self.fail_until:
            return
        self.fail_next = max(self.fail_next - 1, 0)
        self.failed += 1
        self.on_fault(statement.split(None, 1)[0].upper())
        raise sqlite3.OperationalError("database is locked")
