"""Client API keys on the OpenAI routes (client_auth: keys), through the ASGI app with a
FakeProvider whose engines are a stub upstream: 401/404/429/503 envelopes, limits, budgets, and
cost by key."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_lifecycle import FakeClock
from tests.api.test_openai_routes import assert_envelope
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODELS = {"org/chat": {}, "org/other": {}, "team-a/small": {}}
PRICES = {"default_gpu_hour": 3.6, "gpu_hour": {}}  # $0.001 per GPU-second


@pytest.fixture
def stub() -> Iterator[tuple[str, dict[str, Any]]]:
    """A stub engine of our own, whose counters show what the gateway forwarded."""
    app = make_app()
    with serve_in_thread(app) as url:
        yield url, app.state.counters


def keyed(tmp_path: Path, **overrides: Any) -> Any:
    return make_settings(tmp_path, MODELS, client_auth="keys", **overrides)


async def create_key(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await client.post("/admin/keys", headers=ADMIN, json={"name": "test", **fields})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    assert created["key"].startswith("sk-gw-") and created["state"] == "active"
    return created


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def chat(model: str = "org/chat", **extra: Any) -> dict[str, Any]:
    return {**CHAT_BODY, "model": model, **extra}


async def test_a_key_chats_and_never_reaches_the_engine(
    tmp_path: Path, stub: tuple[str, dict[str, Any]]
) -> None:
    url, seen = stub
    provider = FakeProvider(endpoint=url)
    async with running_gateway(keyed(tmp_path), provider) as (app, client):
        key = await create_key(client)
        for body in (chat(), chat(stream=True), chat()):  # cold, then hot; buffered and streamed
            r = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert r.status_code == 200, r.text
            assert seen["authorization"] != f"Bearer {key['key']}"
        assert provider.launches[0].engine_key is not None
        assert seen["authorization"] == f"Bearer {provider.launches[0].engine_key}"  # the engine's own
        await app.state.usage.flush()
        rows = app.state.store.usage_minutes()
        assert {r.api_key_id for r in rows} == {key["id"]}
        assert sum(r.requests for r in rows) == 3
        starters = app.state.store.started_by([d.id for d in app.state.store.deployments()])
        assert list(starters.values()) == [key["id"]]  # the cold start is the key's
        listed = (await client.get("/admin/keys", headers=ADMIN)).json()
        assert [k["id"] for k in listed] == [key["id"]] and "key" not in listed[0]


async def test_missing_wrong_revoked_and_expired_keys_get_401(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(keyed(tmp_path), provider, clock) as (app, client):
        good = await create_key(client)
        revoked = await create_key(client)
        expiring = await create_key(client, expires_at=(clock() + timedelta(hours=1)).isoformat())
        elsewhere = await create_key(client)  # revoked in the database by another gateway
        assert (
            await client.post("/v1/chat/completions", json=chat(), headers=bearer(good))
        ).status_code == 200
        assert (await client.delete(f"/admin/keys/{revoked['id']}", headers=ADMIN)).json()[
            "state"
        ] == "revoked"
        app.state.store.revoke_key(elsewhere["id"], clock())
        await app.state.keys.refresh()  # what the key cache's periodic task does every tick
        clock.advance(3601)
        cases = [
            ({}, "Missing API key"),
            ({"Authorization": "Basic dXNlcjpwYXNz"}, "Missing API key"),
            ({"Authorization": "Bearer sk-gw-not-a-key"}, "Incorrect API key"),
            ({"Authorization": good["key"]}, "Missing API key"),  # no scheme
            (bearer(revoked), "revoked"),
            (bearer(elsewhere), "revoked"),
            (bearer(expiring), "expired"),
        ]
        for headers, words in cases:
            for path in ("/v1/chat/completions", "/v1/embeddings"):
                r = await client.post(path, json=chat(), headers=headers)
                error = assert_envelope(r, 401, "invalid_api_key")
                assert words in error["message"], (headers, error)
            r = await client.get("/v1/models", headers=headers)
            assert_envelope(r, 401, "invalid_api_key")
        states = {k["id"]: k["state"] for k in (await client.get("/admin/keys", headers=ADMIN)).json()}
        assert states == {
            good["id"]: "active",
            revoked["id"]: "revoked",
            expiring["id"]: "expired",
            elsewhere["id"]: "revoked",
        }
        r = await client.delete("/admin/keys/key-000000000000", headers=ADMIN)
        assert_envelope(r, 404, "key_not_found")
    assert len(provider.launches) == 1  # refused requests started nothing


async def test_models_outside_the_keys_globs_do_not_exist_for_it(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(keyed(tmp_path), provider) as (_, client):
        key = await create_key(client, models=["team-a/*", "org/ch?t"])
        listed = (await client.get("/v1/models", headers=bearer(key))).json()["data"]
        assert [m["id"] for m in listed] == ["org/chat", "team-a/small"]
        r = await client.post("/v1/chat/completions", json=chat("org/other"), headers=bearer(key))
        error = assert_envelope(r, 404, "model_not_found")
        unknown = await client.post("/v1/chat/completions", json=chat("org/nope"), headers=bearer(key))
        assert unknown.json()["error"]["message"].replace("org/nope", "org/other") == error["message"]
        assert provider.launches == []
        r = await client.post("/v1/chat/completions", json=chat("team-a/small"), headers=bearer(key))
        assert r.status_code == 200


async def test_a_key_without_wake_is_refused_on_a_cold_model_and_served_once_loaded(
    tmp_path: Path, stub_url: str
) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(keyed(tmp_path), provider) as (app, client):
        key = await create_key(client, may_wake=False)
        for body in (chat(), chat(stream=True)):
            r = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
            error = assert_envelope(r, 503, "model_not_running")
            assert "may not start models" in error["message"] and int(r.headers["retry-after"]) > 0
        assert provider.launches == []
        r = await client.post("/admin/models/org/chat/load?wait=true", headers=ADMIN)
        assert r.status_code == 200 and r.json()["state"] == "ready"
        for body in (chat(), chat(stream=True)):
            r = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert r.status_code == 200, r.text
        starters = app.state.store.started_by([d.id for d in app.state.store.deployments()])
        assert list(starters.values()) == ["admin"]


async def test_requests_per_minute_give_429_with_retry_after(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(keyed(tmp_path), provider) as (_, client):
        limited = await create_key(client, requests_per_minute=3)
        other = await create_key(client)
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(limited))
            assert r.status_code == 200
        r = await client.post("/v1/chat/completions", json=chat(stream=True), headers=bearer(limited))
        error = assert_envelope(r, 429, "rate_limit_exceeded")
        assert error["type"] == "requests" and "3 requests per minute" in error["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 120
        for _ in range(5):  # another key has its own window
            r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(other))
            assert r.status_code == 200


async def test_tokens_per_minute_count_the_answers_usage(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(keyed(tmp_path), provider) as (_, client):
        key = await create_key(client, tokens_per_minute=15)  # one answer of the stub: 9 tokens
        r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert r.status_code == 200
        r = await client.post("/v1/chat/completions", json=chat(stream=True), headers=bearer(key))
        assert r.status_code == 200 and "usage" not in r.text  # usage read, and stripped again
        r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        error = assert_envelope(r, 429, "rate_limit_exceeded")
        assert error["type"] == "tokens" and int(r.headers["retry-after"]) >= 1


async def test_a_spent_budget_gives_insufficient_quota(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, clock=clock, launch_seconds=60, ready_seconds=40)
    settings = keyed(tmp_path, costs=PRICES)
    async with running_gateway(settings, provider, clock) as (app, client):
        key = await create_key(client, monthly_budget=0.15)
        r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert r.status_code == 200  # its cold start: 100 s, $0.10
        await app.state.keys.refresh()
        [listed] = (await client.get("/admin/keys", headers=ADMIN)).json()
        assert listed["spent_this_month"] == pytest.approx(0.1)
        r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert r.status_code == 200  # $0.10 of $0.15
        await app.state.reaper.tick(clock.advance(30))  # serving, then idle: all of it the key's
        await app.state.usage.flush()
        clock.advance(30)
        await app.state.keys.refresh()
        [listed] = (await client.get("/admin/keys", headers=ADMIN)).json()
        assert listed["spent_this_month"] == pytest.approx(0.16)
        r = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        error = assert_envelope(r, 429, "insufficient_quota")
        assert "monthly budget of $0.15" in error["message"]
        assert "retry-after" not in r.headers


async def test_costs_by_key_and_team_add_up_to_the_models_total(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, clock=clock, launch_seconds=60, ready_seconds=40)
    settings = keyed(tmp_path, costs=PRICES, keep_hot_seconds=600)
    async with running_gateway(settings, provider, clock) as (app, client):
        reaper = app.state.reaper
        a = await create_key(client, team="search")
        b = await create_key(client, team="ads")
        c = await create_key(client, team="ads")
        reaper.last_tick = clock()
        # The fake provider's clock: each start takes 100 s (60 launching, 40 loading).
        await client.post("/admin/models/org/other/load?wait=true", headers=ADMIN)  # admin's start
        await client.post("/v1/chat/completions", json=chat(), headers=bearer(a))  # a starts org/chat
        await client.post("/v1/chat/completions", json=chat(), headers=bearer(b))
        await client.post("/v1/chat/completions", json=chat(), headers=bearer(b))
        await client.post("/v1/embeddings", json=chat(), headers=bearer(c))  # 3 tokens
        await reaper.tick(clock.advance(10))
        await reaper.tick(clock.advance(50))
        await app.state.usage.flush()
        params = {"since": (clock() - timedelta(hours=1)).isoformat(), "until": clock().isoformat()}

        async def costs(group_by: str) -> dict[str, dict[str, float]]:
            r = await client.get("/admin/costs", headers=ADMIN, params={**params, "group_by": group_by})
            assert r.status_code == 200, r.text
            return {row[group_by]: row for row in r.json()}

        by_model, by_key, by_team = await costs("model"), await costs("key"), await costs("team")
        total = sum(row["dollars"] for row in by_model.values())
        assert total == pytest.approx(0.1 + 0.16 + 0.1 + 0.06)  # org/other: 100 s cold, 160 s ready
        for rows in (by_key, by_team):
            assert sum(row["dollars"] for row in rows.values()) == pytest.approx(total)
            for phase in ("cold", "serving", "idle"):
                expected = sum(row[f"{phase}_dollars"] for row in by_model.values())
                assert sum(row[f"{phase}_dollars"] for row in rows.values()) == pytest.approx(expected)
        assert set(by_key) == {a["id"], b["id"], c["id"], "admin", "-"}
        assert by_key[a["id"]]["cold_dollars"] == pytest.approx(0.1)  # its request started org/chat
        assert by_key["admin"]["cold_dollars"] == pytest.approx(0.1)  # the admin load of org/other
        assert by_key["-"]["dollars"] == pytest.approx(0.16)  # org/other's ready time: nobody used it
        ready = 0.06  # org/chat's 60 s ready, split 9 : 18 : 3 by tokens
        assert by_key[a["id"]]["dollars"] - 0.1 == pytest.approx(ready * 9 / 30)
        assert by_key[b["id"]]["dollars"] == pytest.approx(ready * 18 / 30)
        assert by_key[c["id"]]["dollars"] == pytest.approx(ready * 3 / 30)
        assert by_team["ads"]["dollars"] == pytest.approx(ready * 21 / 30)
        assert set(by_team) == {"search", "ads", "admin", "-"}
        metrics = (await client.get("/metrics")).text  # this month's, by team
        for team in ("search", "ads", "admin", "-"):
            line = f'llmgw_team_cost_month_dollars{{team="{team}"}} '
            [value] = [float(m.removeprefix(line)) for m in metrics.splitlines() if m.startswith(line)]
            assert value == pytest.approx(by_team[team]["dollars"], abs=1e-6)
        params.update(group_by="team", format="csv")
        csv = await client.get("/admin/costs", headers=ADMIN, params=params)
        assert csv.text.splitlines()[0].startswith("team,dollars,")
