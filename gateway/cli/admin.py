"""`llm-gateway admin ...`: the admin API from a terminal. Lists print as tables (`--json` for
the raw answer). The token comes from `--token` or LLMGW_ADMIN_TOKEN. Times given to
`--since`/`--until` are ISO 8601; a date alone is its midnight, and no zone means UTC."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

admin = typer.Typer(help="Steer a running gateway through its admin API.", no_args_is_help=True)

MODEL_COLUMNS = [
    "id",
    "state",
    "priority",
    "keep_hot_seconds",
    "gpus_per_replica",
    "in_flight",
    "waiting",
    "failure",
]


class Target:
    def __init__(self, url: str, token: str, as_json: bool) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.as_json = as_json

    def call(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            response = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=None, **kwargs)
        except httpx.HTTPError as exc:
            typer.echo(f"llm-gateway admin: cannot reach {self.url}: {exc}", err=True)
            raise typer.Exit(1) from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            typer.echo(f"llm-gateway admin: {response.status_code}: {message}", err=True)
            raise typer.Exit(1)
        return response.text if raw else response.json()

    def show(self, data: Any, columns: list[str] | None = None) -> None:
        if self.as_json or columns is None or not isinstance(data, list):
            typer.echo(json.dumps(data, indent=2))
        else:
            print_table(data, columns)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in columns))  # Text: values are not markup
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=100_000)  # piped: one line per row, for grep
    console.print(table)
    if not rows:
        console.print("(none)")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def utc_time(value: str | None) -> str | None:
    """A `--since`/`--until` value as an ISO time in UTC (no zone given: UTC)."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (2026-11-27, 2026-11-27T10:00)"
        ) from exc
    return (at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)).isoformat()


def _model_path(model: str) -> str:
    return quote(model, safe="/")


@admin.callback()
def connect(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="LLMGW_URL", help="The gateway's base URL.")
    ] = "http://127.0.0.1:8000",
    token: Annotated[str, typer.Option(envvar="LLMGW_ADMIN_TOKEN", help="Admin bearer token.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
) -> None:
    if not token:
        typer.echo("llm-gateway admin: give --token or set LLMGW_ADMIN_TOKEN", err=True)
        raise typer.Exit(2)
    ctx.obj = Target(url, token, as_json)


@admin.command("models")
def models(ctx: typer.Context) -> None:
    """List models with their state."""
    target: Target = ctx.obj
    target.show(target.call("GET", "/admin/models"), MODEL_COLUMNS)


@admin.command("model")
def model(ctx: typer.Context, model_id: str) -> None:
    """Show one model."""
    ctx.obj.show(ctx.obj.call("GET", f"/admin/models/{_model_path(model_id)}"))


@admin.command("load")
def load(
    ctx: typer.Context, model_id: str, wait: Annotated[bool, typer.Option(help="Wait until ready.")] = False
) -> None:
    """Start a model's engine (pre-warm)."""
    ctx.obj.show(ctx.obj.call("POST", f"/admin/models/{_model_path(model_id)}/load", params={"wait": wait}))


@admin.command("unload")
def unload(ctx: typer.Context, model_id: str) -> None:
    """Stop a model's engine."""
    ctx.obj.show(ctx.obj.call("POST", f"/admin/models/{_model_path(model_id)}/unload"))


@admin.command("set")
def set_model(
    ctx: typer.Context,
    model_id: str,
    priority: Annotated[int | None, typer.Option(help="New priority (>= 2 is pinned).")] = None,
    keep_hot: Annotated[float | None, typer.Option(help="New keep-hot time in seconds.")] = None,
    reset: Annotated[bool, typer.Option(help="Clear both overrides (back to the reference file).")] = False,
) -> None:
    """Change a model's priority or keep-hot time."""
    body: dict[str, Any] = {"priority": None, "keep_hot_seconds": None} if reset else {}
    if priority is not None:
        body["priority"] = priority
    if keep_hot is not None:
        body["keep_hot_seconds"] = keep_hot
    ctx.obj.show(ctx.obj.call("PATCH", f"/admin/models/{_model_path(model_id)}", json=body))


@admin.command("info")
def info(ctx: typer.Context) -> None:
    """Version, provider, GPUs in use, settings (secrets masked)."""
    ctx.obj.show(ctx.obj.call("GET", "/admin/info"))


@admin.command("clusters")
def clusters(ctx: typer.Context) -> None:
    """The provider's engines (like `sky status`)."""
    ctx.obj.show(ctx.obj.call("GET", "/admin/clusters"), ["name", "status", "model", "deployment_id"])


@admin.command("events")
def events(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (launch, idle-stop, ...).")] = None,
    since: Annotated[
        str | None, typer.Option(help="ISO time (UTC if no zone), inclusive.", callback=utc_time)
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="ISO time (UTC if no zone), exclusive.", callback=utc_time)
    ] = None,
    limit: int = 100,
) -> None:
    """Control decisions and why they were taken."""
    params = {k: v for k, v in {"model": model, "kind": kind, "since": since, "until": until}.items() if v}
    rows = ctx.obj.call("GET", "/admin/events", params={**params, "limit": limit})
    ctx.obj.show(rows, ["at", "kind", "model", "message"])


@admin.command("costs")
def costs(
    ctx: typer.Context,
    group_by: Annotated[str, typer.Option(help="model, day, cluster, phase, key or team.")] = "model",
    since: Annotated[
        str | None,
        typer.Option(help="ISO time, UTC if no zone (default: 7 days before until).", callback=utc_time),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="ISO time, UTC if no zone (default: now).", callback=utc_time)
    ] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
) -> None:
    """GPU cost by model, day, cluster, phase, client API key or team, split into cold, serving,
    idle, spare and failed."""
    target: Target = ctx.obj
    params = {k: v for k, v in {"group_by": group_by, "since": since, "until": until}.items() if v}
    if csv:
        typer.echo(target.call("GET", "/admin/costs", params={**params, "format": "csv"}, raw=True), nl=False)
        return
    rows = target.call("GET", "/admin/costs", params=params)
    columns = [
        group_by,
        "dollars",
        "gpu_hours",
        "cold_dollars",
        "serving_dollars",
        "idle_dollars",
        "spare_dollars",
        "failed_dollars",
    ]
    target.show(rows, columns)


@admin.command("failures")
def failures(ctx: typer.Context) -> None:
    """Models whose engine failed to start."""
    ctx.obj.show(ctx.obj.call("GET", "/admin/failures"), ["model", "at", "error"])


@admin.command("reset-failure")
def reset_failure(ctx: typer.Context, model_id: Annotated[str | None, typer.Argument()] = None) -> None:
    """Forget one model's failure, or all of them."""
    path = f"/admin/failures/{_model_path(model_id)}" if model_id else "/admin/failures"
    ctx.obj.show(ctx.obj.call("DELETE", path))


@admin.command("reload")
def reload(ctx: typer.Context) -> None:
    """Reload the model reference file (the old one stays if the new one is invalid)."""
    ctx.obj.show(ctx.obj.call("POST", "/admin/reload"))


@admin.command("reset")
def reset(ctx: typer.Context) -> None:
    """Unload every model and forget every failure."""
    ctx.obj.show(ctx.obj.call("POST", "/admin/reset"))
