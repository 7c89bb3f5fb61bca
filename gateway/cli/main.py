"""The `llm-gateway` command."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import SecretStr

from gateway.cli.admin import admin
from gateway.cli.admin_keys import keys
from gateway.cli.db import db
from gateway.cli.weights import weights
from gateway.config.reference import ReferenceError
from gateway.config.settings import ConfigFileError, Settings, load_settings

# Seconds uvicorn lets open connections finish on SIGTERM before the lifespan shutdown runs
# (which stops the engines): long enough for a short answer, short enough not to bill GPUs.
GRACEFUL_SHUTDOWN_SECONDS = 10

app = typer.Typer(
    help="llm-gateway: an OpenAI-compatible gateway that starts LLM engines on demand.", no_args_is_help=True
)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: that is per-request noise on the hot path and health polls.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (overrides settings).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (overrides settings).")] = None,
    dev: Annotated[
        bool,
        typer.Option(
            "--dev",
            help="Development: without an admin_token, generate one and print it once; upgrade an older "
            "database schema.",
        ),
    ] = False,
) -> None:
    """Start the gateway (settings: defaults < --config file < LLMGW_* environment < flags)."""
    from gateway.app import ProviderUnavailable, create_app
    from state.schema import SchemaError

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = load_settings(config, **overrides)
    except (ConfigFileError, ValueError) as exc:
        typer.echo(f"llm-gateway: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    if settings.admin_token is None:
        if not dev:
            typer.echo(
                "llm-gateway: admin_token is not set (LLMGW_ADMIN_TOKEN or `admin_token:` in the config); "
                "refusing to start. Use --dev to generate one for development.",
                err=True,
            )
            raise typer.Exit(2)
        generated = secrets.token_urlsafe(24)
        settings = settings.model_copy(update={"admin_token": SecretStr(generated)})
        # Printed once, to the terminal only (not through logging): it is needed for /admin.
        typer.echo(f"llm-gateway --dev: admin token for this run: {generated}", err=True)
    if dev:
        settings = settings.model_copy(update={"upgrade_database_on_start": True})
    if dev and (opened := dev_client_auth(settings)) is not settings:
        settings = opened
        typer.echo(
            f"llm-gateway --dev: client_auth open on {settings.host}: /v1 takes no API key "
            "(set client_auth: keys to try keys)",
            err=True,
        )
    setup_logging(settings.log_level)
    try:
        application = create_app(settings)
    except (ReferenceError, ProviderUnavailable, SchemaError) as exc:
        typer.echo(f"llm-gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # The gateway reads no client address: uvicorn's X-Forwarded-For parsing (an IP address
        # parsed per request) is work for nothing on the hot path.
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def dev_client_auth(settings: Settings) -> Settings:
    """`--dev`: open access when client_auth is not set and the gateway listens on loopback only
    (anywhere else, or when set, the settings are kept)."""
    if settings.client_auth is None and _loopback(settings.host):
        return settings.model_copy(update={"client_auth": "open"})
    return settings


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command()
def check(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")] = None,
) -> None:
    """Validate the settings and the model reference file, then exit."""
    from gateway.config.reference import load_reference

    try:
        settings = load_settings(config)
        specs = load_reference(settings.model_reference)
    except (ConfigFileError, ReferenceError, ValueError) as exc:
        typer.echo(f"llm-gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{settings.model_reference}: {len(specs)} models OK")


@app.command("export")
def export(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")] = None,
    day: Annotated[
        list[str] | None, typer.Option(help="UTC day YYYY-MM-DD (repeat); default: the finished days.")
    ] = None,
) -> None:
    """Write usage and cost files of finished days to S3 now (idempotent)."""
    from datetime import UTC, date, datetime

    from gateway.accounting.export import export_days, finished_days, s3_client
    from state import Store

    settings = load_settings(config)
    if not settings.export.bucket:
        typer.echo("llm-gateway: export.bucket is not set", err=True)
        raise typer.Exit(2)
    days = (
        [date.fromisoformat(d) for d in day]
        if day
        else finished_days(datetime.now(UTC), settings.export.days_back)
    )
    store = Store(settings.resolved_database_url)
    for result in export_days(
        store, s3_client(), bucket=settings.export.bucket, prefix=settings.export.prefix, days=days
    ):
        typer.echo(
            f"{'written  ' if result.written else 'unchanged'} s3://{settings.export.bucket}/{result.key} ({result.rows} rows)"
        )


admin.add_typer(keys, name="keys")
app.add_typer(admin, name="admin")
app.add_typer(weights, name="weights")
app.add_typer(db, name="db")


def main() -> None:
    app()
