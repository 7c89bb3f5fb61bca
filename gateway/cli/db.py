"""`llm-gateway db upgrade|current|revision`: the database schema (Alembic, state/migrations)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from alembic import command
from sqlalchemy.engine.url import make_url

from gateway.config.settings import ConfigFileError, Settings, load_settings
from state import Store
from state.schema import MIGRATIONS, SchemaError, alembic_config, scripts

db = typer.Typer(help="The database schema: its revision and upgrades.", no_args_is_help=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (ConfigFileError, ValueError) as exc:
        typer.echo(f"llm-gateway: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc


def _where(settings: Settings) -> str:
    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


@db.command()
def current(config: ConfigOption = None) -> None:
    """Print the database's schema revision and this code's."""
    settings = _settings(config)
    store = Store(settings.resolved_database_url)
    try:
        typer.echo(f"{_where(settings)}: {store.status().describe()}")
    except SchemaError as exc:
        typer.echo(f"llm-gateway: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        store.close()


@db.command()
def upgrade(config: ConfigOption = None) -> None:
    """Upgrade the database schema to this code's revision (back the database up first)."""
    settings = _settings(config)
    store = Store(settings.resolved_database_url)
    try:
        before = store.status()
        after = store.upgrade()
    except SchemaError as exc:
        typer.echo(f"llm-gateway: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        store.close()
    typer.echo(f"{_where(settings)}: revision {before.current or '(empty)'} -> {after.current}")


@db.command()
def revision(message: Annotated[str, typer.Option("--message", "-m", help="What it changes.")]) -> None:
    """For developers: write a new revision in state/migrations/versions with what the tables
    (state/tables.py) have that the newest revision lacks (Alembic's autogenerate). Review it."""
    head = scripts().get_current_head()
    next_id = f"{int(head or '0') + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'head.db'}")
        store.upgrade()
        with store.engine.begin() as conn:
            config = alembic_config(conn)
            config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
            command.revision(config, message=message, autogenerate=True, rev_id=next_id)
        store.close()
    typer.echo(
        f"written: {MIGRATIONS / 'versions'}/{next_id}_*.py (review it, `ruff format` it, run tests/unit/test_migrations.py)"
    )
