"""`llm-gateway admin keys create|list|revoke`: client API keys through /admin/keys. The key is
printed once, by `create`; nothing else ever shows it."""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli.admin import Target, utc_time

keys = typer.Typer(help="Client API keys for the OpenAI routes.", no_args_is_help=True)

KEY_COLUMNS = [
    "id",
    "name",
    "team",
    "state",
    "models",
    "may_wake",
    "requests_per_minute",
    "tokens_per_minute",
    "monthly_budget",
    "spent_this_month",
    "expires_at",
]


@keys.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="What the key is for.")],
    team: Annotated[str, typer.Option(help="Owner or team label (costs by team).")] = "",
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Allowed model glob (repeat); default all.")
    ] = None,
    wake: Annotated[
        bool, typer.Option("--wake/--no-wake", help="May start models that are not running.")
    ] = True,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    budget: Annotated[float | None, typer.Option(help="Monthly budget in dollars.")] = None,
    expires: Annotated[
        str | None, typer.Option(help="Expiry, ISO time (UTC if no zone).", callback=utc_time)
    ] = None,
) -> None:
    """Create a key and print it once (it cannot be shown again)."""
    target: Target = ctx.obj
    body = {
        "name": name,
        "team": team,
        "models": model or ["*"],
        "may_wake": wake,
        "requests_per_minute": rpm,
        "tokens_per_minute": tpm,
        "monthly_budget": budget,
        "expires_at": expires,
    }
    created = target.call("POST", "/admin/keys", json=body)
    if target.as_json:
        target.show(created)
        return
    typer.echo(f"{created['id']} ({created['name']}, team {created['team'] or '-'})")
    typer.echo(created["key"])
    typer.echo("This key is shown once: store it now.", err=True)


@keys.command("list")
def list_keys(ctx: typer.Context) -> None:
    """Every key with its state, limits and spend (never the key itself)."""
    target: Target = ctx.obj
    rows = target.call("GET", "/admin/keys")
    for row in rows:
        row["models"] = ",".join(row["models"])
    target.show(rows, KEY_COLUMNS)


@keys.command("revoke")
def revoke(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key's id (key-...).")]
) -> None:
    """Revoke a key: its requests get 401 from now on."""
    target: Target = ctx.obj
    target.show(target.call("DELETE", f"/admin/keys/{key_id}"))
