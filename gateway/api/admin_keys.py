"""/admin/keys: client API keys for the OpenAI routes. The key itself is in the answer to its
creation only; the gateway keeps its SHA-256."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.deps import ControllerDep, StoreDep, require_admin
from gateway.api.errors import GatewayError, error_doc
from gateway.api.schemas import AT, Out, QueryTime, Time
from gateway.auth.keyring import KeyRing
from gateway.auth.keys import hash_key, new_key_id, new_secret, patterns_of
from state import ApiKey

router = APIRouter(
    prefix="/admin/keys",
    tags=["Admin"],
    dependencies=[Depends(require_admin)],
    responses={401: error_doc("Missing or wrong bearer token"), 404: error_doc("Unknown key")},
)


def get_keys(request: Request) -> KeyRing:
    keys: KeyRing = request.app.state.keys
    return keys


KeysDep = Annotated[KeyRing, Depends(get_keys)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "search-backend", "team": "search", "models": ["meta-llama/*"]}]
        },
    )

    name: str = Field(min_length=1, max_length=256)
    team: str = Field("", max_length=256, description="Owner or team label, for costs by team.")
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        ["*"], min_length=1, description="Glob patterns of the model ids the key may use."
    )
    may_wake: bool = Field(True, description="May start a model that is not running (a cold start).")
    requests_per_minute: int | None = Field(None, ge=1, le=10**12)
    tokens_per_minute: int | None = Field(None, ge=1, le=10**15)
    monthly_budget: float | None = Field(
        None, ge=0, le=10**12, allow_inf_nan=False, description="Dollars per UTC calendar month."
    )
    expires_at: QueryTime | None = Field(None, description="ISO 8601; no zone means UTC. Default: never.")


class KeyOut(Out):
    id: str = Field(examples=["key-3f2a9c1b7e4d"])
    name: str = Field(examples=["search-backend"])
    team: str = Field(examples=["search"])
    models: list[str] = Field(examples=[["meta-llama/*"]])
    may_wake: bool = Field(examples=[True])
    requests_per_minute: int | None = Field(examples=[600])
    tokens_per_minute: int | None = Field(examples=[None])
    monthly_budget: float | None = Field(examples=[500.0])
    spent_this_month: float | None = Field(
        description="Dollars attributed this UTC month (as of the last refresh; keys with a budget).",
        examples=[12.5],
    )
    state: str = Field(description="active, revoked or expired.", examples=["active"])
    created_at: Time = Field(examples=[AT])
    expires_at: Time | None = Field(examples=[None])
    revoked_at: Time | None = Field(examples=[None])


class KeyCreated(KeyOut):
    key: str = Field(description="The API key: shown this once, never again.", examples=["sk-gw-..."])


def key_out(row: ApiKey, keys: KeyRing, now: datetime) -> KeyOut:
    if row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at is not None and now >= row.expires_at:
        state = "expired"
    else:
        state = "active"
    spent = keys.spent.get(row.id, 0.0) if row.monthly_budget is not None else None
    return KeyOut(
        id=row.id,
        name=row.name,
        team=row.team,
        models=list(patterns_of(row.models)),
        may_wake=row.may_wake,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        monthly_budget=row.monthly_budget,
        spent_this_month=None if spent is None else round(spent, 6),
        state=state,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


@router.post(
    "",
    status_code=201,
    summary="Create a client API key",
    description="The answer's `key` is the only time the key is shown; store it now.",
)
async def create_key(
    body: KeyCreate, store: StoreDep, controller: ControllerDep, keys: KeysDep
) -> KeyCreated:
    secret, now = new_secret(), controller.clock()
    row = ApiKey(
        id=new_key_id(),
        key_hash=hash_key(secret),
        models=json.dumps(body.models),
        created_at=now,
        **body.model_dump(exclude={"models"}),
    )
    store.add_key(row)
    store.record_event(kind="admin-key-create", message=f"key {row.id} ({row.name!r}, team {row.team!r})")
    await keys.refresh()
    return KeyCreated(**key_out(row, keys, now).model_dump(), key=secret)


@router.get("", summary="List client API keys", description="Every key (never the key itself), oldest first.")
async def list_keys(store: StoreDep, controller: ControllerDep, keys: KeysDep) -> list[KeyOut]:
    now = controller.clock()
    return [key_out(row, keys, now) for row in store.api_keys()]


@router.delete(
    "/{key_id}",
    summary="Revoke a client API key",
    description="Requests with it get 401 from now on (on other gateways of the same database: within "
    "`reaper_interval_seconds`). The key's usage and costs are kept.",
)
async def revoke_key(key_id: str, store: StoreDep, controller: ControllerDep, keys: KeysDep) -> KeyOut:
    now = controller.clock()
    if not store.revoke_key(key_id, now) and store.get_key(key_id) is None:
        raise GatewayError(404, f"No API key {key_id}.", type="not_found_error", code="key_not_found")
    store.record_event(kind="admin-key-revoke", message=f"key {key_id} revoked")
    await keys.refresh()
    row = store.get_key(key_id)
    assert row is not None
    return key_out(row, keys, now)
