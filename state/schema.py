"""The database schema's revision: read, checked at startup, upgraded (Alembic: state/migrations,
configured here in code, no alembic.ini).

A database made by `create_all` before there were migrations (every table of revision 0001, no
`alembic_version`) counts as revision 0001: an upgrade stamps it so, then upgrades it. An empty
database is upgraded to the newest revision whatever the caller allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

import state.tables  # noqa: F401  (the tables, on SQLModel.metadata)

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"
# The tables of revision 0001 (the schema released at 48b3a80).
RELEASED_TABLES = frozenset(
    {"models", "deployments", "events", "cost_intervals", "controller_lease", "usage"}
)
# Two gateways upgrading one PostgreSQL database at once: the second waits for the first.
_PG_LOCK_KEY = 0x6C6C6D67  # "llmg"


class SchemaError(Exception):
    """The database's schema is not the one this code needs (the message says what to do)."""


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None  # None: an empty database
    head: str  # the newest revision this code knows
    known: bool  # this code has the current revision (False: written by newer code)
    stamped: bool  # False: made by create_all before migrations (current is then 0001)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def describe(self) -> str:
        if self.current is None:
            return f"empty database; this code's revision is {self.head}"
        made = "" if self.stamped else " (made before migrations)"
        return f"database revision {self.current}{made}; this code's revision is {self.head}"


def scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration, in code: the packaged scripts, run on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _status(conn: Connection) -> SchemaStatus:
    script = scripts()
    head = script.get_current_head()
    assert head is not None
    current = MigrationContext.configure(conn).get_current_revision()
    stamped = True
    if current is None:
        tables = set(inspect(conn).get_table_names())
        if tables >= RELEASED_TABLES:
            current, stamped = FIRST_REVISION, False
        elif tables & set(SQLModel.metadata.tables):
            raise SchemaError(
                f"the database has some of the gateway's tables ({', '.join(sorted(tables))}) but no "
                "migration revision and not all tables of the first release: not upgraded automatically"
            )
    return SchemaStatus(current, head, current is None or _has(script, current), stamped)


def _has(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def status(engine: Engine) -> SchemaStatus:
    with engine.connect() as conn:
        return _status(conn)


def upgrade(engine: Engine) -> SchemaStatus:
    """Upgrade the database to this code's newest revision (one transaction on PostgreSQL)."""
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            _upgrade(conn)
    except DBAPIError:
        # Another process upgrading the same SQLite file at the same moment: fine if it got there.
        if not status(engine).up_to_date:
            raise
    return status(engine)


def _upgrade(conn: Connection) -> None:
    before = _status(conn)
    if not before.known:
        raise SchemaError(f"{before.describe()}: the database is newer than this code")
    if before.up_to_date and before.stamped:
        return
    config = alembic_config(conn)
    if not before.stamped:
        command.stamp(config, FIRST_REVISION)
    command.upgrade(config, "head")


def prepare(engine: Engine, *, upgrade_allowed: bool) -> SchemaStatus:
    """At startup: an empty database is created, an older one upgraded when allowed; a newer
    one, or an older one without permission, raises SchemaError naming both revisions."""
    current = status(engine)
    if current.up_to_date and current.stamped:
        return current
    if current.current is None:
        return upgrade(engine)
    if not current.known:
        raise SchemaError(
            f"{current.describe()}: the database was upgraded by a newer llm-gateway; run that "
            "version (or restore a backup taken before its upgrade)"
        )
    if not upgrade_allowed:
        raise SchemaError(
            f"{current.describe()}: the database is older than this code; back it up and run "
            "`llm-gateway db upgrade` (or start with --dev, which upgrades automatically)"
        )
    return upgrade(engine)
