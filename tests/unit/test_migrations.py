"""Schema migrations (state/migrations) on SQLite and PostgreSQL: a database at revision 0001,
filled, is upgraded with every row kept; one made by the released `create_all` is recognised;
startup refuses a newer database, and an older one unless allowed; the revisions make exactly
the tables of the code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Boolean, DateTime, Float, Integer, MetaData, String, Table, inspect, select, text
from sqlmodel import SQLModel
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli.main import app as cli
from state import DeploymentState, Store
from state.schema import FIRST_REVISION, SchemaError, alembic_config, scripts
from tests.conftest import make_settings
from tests.fakes import FakeProvider

T0 = datetime(2026, 11, 20, 9, 30, 15, 123456, tzinfo=UTC)
HEAD = scripts().get_current_head()


def at_revision(url: str, revision: str) -> Store:
    store = Store(url)
    with store.engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    return store


def _value(column: Any, n: int) -> Any:
    if isinstance(column.type, Boolean):
        return n % 2 == 0
    if isinstance(column.type, Integer):
        return n if column.name == "id" else 1000 + n
    if isinstance(column.type, Float):
        return n + 0.25
    if isinstance(column.type, DateTime):
        return T0 + timedelta(minutes=n)
    assert isinstance(column.type, String), (column.table.name, column.name, column.type)
    return f"{column.table.name}-{column.name}-{n}"[: column.type.length or 100]


def fill(store: Store, rows_per_table: int = 3) -> dict[str, list[dict[str, Any]]]:
    """A few rows in every table, a value in every column; what was written, by table."""
    meta = MetaData()
    meta.reflect(store.engine)
    written: dict[str, list[dict[str, Any]]] = {}
    with store.engine.begin() as conn:
        for table in meta.sorted_tables:
            if table.name == "alembic_version":
                continue
            count = 1 if table.name in {"controller_lease", "installation"} else rows_per_table
            rows = [{c.name: _value(c, n) for c in table.columns} for n in range(1, count + 1)]
            conn.execute(table.insert(), rows)
            written[table.name] = rows
    return written


def read_back(store: Store, table_name: str) -> list[dict[str, Any]]:
    table = Table(table_name, MetaData(), autoload_with=store.engine)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
    for row in rows:  # SQLite gives back naive UTC times
        for k, v in row.items():
            if isinstance(v, datetime) and v.tzinfo is None:
                row[k] = v.replace(tzinfo=UTC)
    return rows


def test_upgrade_from_revision_1_keeps_every_row(db_url: str) -> None:
    store = at_revision(db_url, FIRST_REVISION)
    written = fill(store)
    assert set(written) == {"models", "deployments", "events", "cost_intervals", "controller_lease", "usage"}
    assert store.upgrade().current == HEAD
    for table, rows in written.items():
        assert [{k: r[k] for k in rows[0]} for r in read_back(store, table)] == rows, table
    # The store reads them as its own (the upgraded schema is the code's) and writes the new tables.
    assert store.get_model("models-id-1").priority_override == 1001  # type: ignore[union-attr]
    dep = store.get_deployment("deployments-id-2")
    assert dep is not None and dep.ready_at == T0 + timedelta(minutes=2)
    assert [e.kind for e in store.events()] == ["events-kind-1", "events-kind-2", "events-kind-3"]
    assert store.lease().holder == "controller_lease-holder-1"  # type: ignore[union-attr]
    assert len(store.intervals()) == 3 and len(store.usage()) == 3
    assert store.instance_id() == store.instance_id()
    assert store.usage_minutes() == []
    store.close()


def test_a_database_made_before_migrations_is_stamped_then_upgraded(db_url: str) -> None:
    """What the released code's create_all made: revision 0001's tables, no alembic_version
    (and, from before d0b4972, no admin override columns)."""
    store = at_revision(db_url, FIRST_REVISION)
    written = fill(store)
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("ALTER TABLE models DROP COLUMN keep_hot_override"))
    status = store.status()
    assert (status.current, status.stamped, status.head) == (FIRST_REVISION, False, HEAD)
    with pytest.raises(
        SchemaError, match=f"revision {FIRST_REVISION} .made before migrations.*revision is {HEAD}"
    ):
        store.prepare(upgrade_allowed=False)
    assert store.status().current == FIRST_REVISION  # a refusal writes nothing
    assert store.prepare(upgrade_allowed=True).current == HEAD
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("cost_intervals")}
    assert "ix_cost_ended" in indexes
    assert [r["id"] for r in read_back(store, "deployments")] == [r["id"] for r in written["deployments"]]
    store.set_overrides("models-id-1", priority=None, keep_hot_seconds=30.0)
    assert store.overrides()["models-id-1"] == {"keep_hot_seconds": 30.0}
    store.close()


def test_the_revisions_make_exactly_the_tables_of_the_code(db_url: str) -> None:
    """A column or table added to state/tables.py without a revision fails here (`llm-gateway
    db revision -m ...` writes one)."""
    store = Store(db_url)
    store.upgrade()
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    store.close()


def test_startup_refuses_a_newer_database_and_an_older_one_unless_allowed(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path, database_url=db_url)
    at_revision(db_url, FIRST_REVISION).close()
    with pytest.raises(
        SchemaError, match=f"revision {FIRST_REVISION}; this code.s revision is {HEAD}.*db upgrade"
    ):
        create_app(settings, provider=FakeProvider())
    upgraded = settings.model_copy(update={"upgrade_database_on_start": True})  # what --dev sets
    create_app(upgraded, provider=FakeProvider()).state.store.close()
    store = Store(db_url)
    assert store.status().current == HEAD
    with store.engine.begin() as conn:  # as a newer llm-gateway would leave it
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match=f"revision 9999; this code's revision is {HEAD}.*newer"):
        create_app(upgraded, provider=FakeProvider())
    with pytest.raises(SchemaError, match="newer than this code"):
        store.upgrade()
    store.close()


def test_an_empty_database_is_created_at_startup(tmp_path: Path, db_url: str) -> None:
    store = create_app(make_settings(tmp_path, database_url=db_url), provider=FakeProvider()).state.store
    assert store.status().current == HEAD
    assert store.create_deployment(deployment_id="d", model="m", provider="fake", gpus=1).current is (
        DeploymentState.PENDING
    )
    store.close()


def test_serve_refuses_then_db_upgrade_upgrades(tmp_path: Path, db_url: str) -> None:
    at_revision(db_url, FIRST_REVISION).close()
    env = {"LLMGW_DATABASE_URL": db_url}
    reference = make_settings(tmp_path).model_reference
    serve_env = {**env, "LLMGW_MODEL_REFERENCE": str(reference), "LLMGW_ADMIN_TOKEN": "t" * 32}
    refused = CliRunner().invoke(cli, ["serve"], env=serve_env)
    assert refused.exit_code == 2
    assert f"revision {FIRST_REVISION}; this code's revision is {HEAD}" in refused.output
    assert "llm-gateway db upgrade" in refused.output
    current = CliRunner().invoke(cli, ["db", "current"], env=env)
    assert (
        current.exit_code == 0
        and f"database revision {FIRST_REVISION}; this code's revision is {HEAD}" in (current.output)
    )
    upgraded = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0 and f"revision {FIRST_REVISION} -> {HEAD}" in upgraded.output
    again = CliRunner().invoke(cli, ["db", "current"], env=env)
    assert f"database revision {HEAD};" in again.output
