"""Every admin endpoint, with and without the bearer token, and model ids with slashes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tasks.provider import ProviderError
from tests.api.test_lifecycle import FakeClock
from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODELS = {"org/chat": {}, "meta-llama/Llama-3.1-8B-Instruct": {"priority": 1}, "pinned": {"priority": 2}}
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"

ENDPOINTS = [
    ("GET", "/admin/models"),
    ("GET", f"/admin/models/{LLAMA}"),
    ("PATCH", f"/admin/models/{LLAMA}"),
    ("POST", f"/admin/models/{LLAMA}/load"),
    ("POST", f"/admin/models/{LLAMA}/unload"),
    ("GET", "/admin/info"),
    ("GET", "/admin/clusters"),
    ("GET", "/admin/events"),
    ("GET", "/admin/failures"),
    ("GET", "/admin/costs"),
    ("DELETE", "/admin/failures"),
    ("DELETE", f"/admin/failures/{LLAMA}"),
    ("POST", "/admin/reload"),
    ("POST", "/admin/reset"),
    ("POST", "/admin/keys"),
    ("GET", "/admin/keys"),
    ("DELETE", "/admin/keys/key-0123456789ab"),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ],
)
async def test_every_endpoint_needs_the_token(tmp_path: Path, stub_url: str, headers: dict) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path, MODELS), provider) as (_, client):
        for method, path in ENDPOINTS:
            r = await client.request(method, path, headers=headers, json={"priority": 1})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "invalid_admin_token"
            assert r.headers["www-authenticate"] == "Bearer"
        assert not provider.launches and not provider.stops


async def test_models_load_unload_and_slashes(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_delay=0.05)
    async with running_gateway(make_settings(tmp_path, MODELS), provider) as (_, client):
        models = (await client.get("/admin/models", headers=AUTH)).json()
        assert [m["id"] for m in models] == list(MODELS)
        assert {m["state"] for m in models} == {"stopped"}
        one = (await client.get(f"/admin/models/{LLAMA}", headers=AUTH)).json()
        assert one["priority"] == one["reference_priority"] == 1 and one["keep_hot_seconds"] == 600
        r = await client.get("/admin/models/org/unknown", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        r = await client.post(f"/admin/models/{LLAMA}/load", headers=AUTH)
        assert r.status_code == 202 and r.json()["model"] == LLAMA
        r = await client.post(f"/admin/models/{LLAMA}/load?wait=true", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"model": LLAMA, "state": "ready"}
        assert [s.model for s in provider.launches] == [LLAMA]
        assert (await client.get(f"/admin/models/{LLAMA}", headers=AUTH)).json()["deployment_id"]

        r = await client.post(f"/admin/models/{LLAMA}/unload", headers=AUTH)
        assert r.json() == {"model": LLAMA, "stopped": True}
        assert not provider.running
        r = await client.post(f"/admin/models/{LLAMA}/unload", headers=AUTH)
        assert r.json()["stopped"] is False


async def test_load_wait_reports_engine_failure(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_error=ProviderError("no such weights"))
    async with running_gateway(make_settings(tmp_path, MODELS), provider) as (_, client):
        r = await client.post("/admin/models/org/chat/load?wait=true", headers=AUTH)
        assert r.status_code == 502 and "no such weights" in r.json()["error"]["message"]
        failures = (await client.get("/admin/failures", headers=AUTH)).json()
        assert [f["model"] for f in failures] == ["org/chat"] and "no such weights" in failures[0]["error"]
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 400
        r = await client.delete("/admin/failures/org/chat", headers=AUTH)
        assert r.json() == {"reset": ["org/chat"]}
        provider.launch_error = None
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200


async def test_change_priority_and_keep_hot(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path, MODELS)
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (app, client):
        r = await client.patch(
            f"/admin/models/{LLAMA}", headers=AUTH, json={"priority": 3, "keep_hot_seconds": 60}
        )
        assert r.status_code == 200
        assert (r.json()["priority"], r.json()["reference_priority"], r.json()["keep_hot_seconds"]) == (
            3,
            1,
            60,
        )
        for bad in ({"priority": -1}, {"priority": "high"}, {"colour": "red"}, {}):
            r = await client.patch(f"/admin/models/{LLAMA}", headers=AUTH, json=bad)
            assert r.status_code == 400, bad
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert app.state.store.events(kind="admin-update")
    # Overrides survive a restart; null clears one.
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (_, client):
        one = (await client.get(f"/admin/models/{LLAMA}", headers=AUTH)).json()
        assert (one["priority"], one["keep_hot_seconds"]) == (3, 60)
        r = await client.patch(f"/admin/models/{LLAMA}", headers=AUTH, json={"priority": None})
        assert (r.json()["priority"], r.json()["keep_hot_seconds"]) == (1, 60)


async def test_info_clusters_events(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path, MODELS, hf_token="hf_do_not_show_me")
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(settings, provider) as (_, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)
        info = (await client.get("/admin/info", headers=AUTH)).json()
        assert info["provider"] == "fake" and info["gpus_in_use"] == 1 and info["deployments"] == {"ready": 1}
        assert info["version"] and info["models"] == 3
        text = json.dumps(info)
        assert ADMIN_TOKEN not in text and "hf_do_not_show_me" not in text
        assert info["settings"]["admin_token"] == "**********"
        clusters = (await client.get("/admin/clusters", headers=AUTH)).json()
        assert (
            len(clusters) == 1 and clusters[0]["model"] == "org/chat" and clusters[0]["status"] == "running"
        )
        events = (await client.get("/admin/events?model=org/chat", headers=AUTH)).json()
        assert [e["kind"] for e in events] == ["launch", "ready"]
        ready_at = events[1]["at"]
        later = (
            await client.get("/admin/events", headers=AUTH, params={"since": ready_at, "kind": "ready"})
        ).json()
        assert len(later) == 1
        assert (
            await client.get("/admin/events", headers=AUTH, params={"until": events[0]["at"]})
        ).json() == []
        r = await client.get("/admin/events", headers=AUTH, params={"since": "yesterday"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "query.since"


async def test_reload_keeps_old_file_on_error(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path, MODELS)
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (_, client):
        settings.model_reference.write_text(json.dumps({"org/chat": {"gpus_per_replica": 0}}))
        r = await client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 400
        assert (
            "gpus_per_replica" in r.json()["error"]["message"] and "org/chat" in r.json()["error"]["message"]
        )
        assert len((await client.get("/admin/models", headers=AUTH)).json()) == 3
        settings.model_reference.write_text(json.dumps({"org/chat": {}, "org/new": {"priority": 1}}))
        r = await client.post("/admin/reload", headers=AUTH)
        assert r.json() == {
            "models": 2,
            "added": ["org/new"],
            "removed": ["meta-llama/Llama-3.1-8B-Instruct", "pinned"],
        }
        assert (
            await client.post("/v1/chat/completions", json={**CHAT_BODY, "model": "org/new"})
        ).status_code == 200
        r = await client.post("/v1/chat/completions", json={**CHAT_BODY, "model": "pinned"})
        assert r.status_code == 404


async def test_reset_unloads_everything(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path, MODELS), provider, FakeClock()) as (_, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)
        await client.post("/v1/chat/completions", json={**CHAT_BODY, "model": "pinned"})
        r = await client.post("/admin/reset", headers=AUTH)
        assert r.json() == {"stopped": ["org/chat", "pinned"], "failures_reset": []}
        assert not provider.running


async def test_swagger_has_bearer_auth_descriptions_and_response_models(
    tmp_path: Path, stub_url: str
) -> None:
    async with running_gateway(make_settings(tmp_path, MODELS), FakeProvider(endpoint=stub_url)) as (
        _,
        client,
    ):
        spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The gateway's `admin_token`.",
    }
    admin_ops = [
        (p, m, op) for p, item in spec["paths"].items() if p.startswith("/admin") for m, op in item.items()
    ]
    assert len(admin_ops) == len(ENDPOINTS)
    for path, method, op in admin_ops:
        assert op["security"] == [{"HTTPBearer": []}], (path, method)
        assert op.get("description"), (path, method)
        # A response model (not an example dict) whose every field has an example for Swagger.
        ok = op["responses"].get("200") or op["responses"]["201"]  # 201: a key created
        schema = ok["content"]["application/json"]["schema"]
        model = response_model(spec, schema)
        for name, field in model["properties"].items():
            assert "examples" in field or "$ref" in field or "default" in field, (path, method, name)


def response_model(spec: dict, schema: dict) -> dict:
    """The component a response schema names, through `array` items."""
    if schema.get("type") == "array":
        schema = schema["items"]
    name = schema["$ref"].removeprefix("#/components/schemas/")
    return spec["components"]["schemas"][name]


def test_admin_token_is_required(tmp_path: Path) -> None:
    from gateway.app import create_app

    with pytest.raises(ValueError, match="admin_token"):
        create_app(make_settings(tmp_path, MODELS, admin_token=None), provider=FakeProvider())


async def test_times_without_a_zone_are_utc(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()  # 2026-03-01 12:00 UTC
    costs = {"default_gpu_hour": 3.6, "gpu_hour": {}}
    settings = make_settings(tmp_path, MODELS, costs=costs, keep_hot_seconds=7200)
    async with running_gateway(settings, FakeProvider(endpoint=stub_url), clock) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY)  # launch + ready at 12:00, 1 GPU
        clock.advance(3600)
        await app.state.reaper.tick(clock())

        async def events(**params: str) -> list[str]:
            r = await client.get("/admin/events", headers=AUTH, params={"model": "org/chat", **params})
            assert r.status_code == 200, (params, r.text)
            return [e["kind"] for e in r.json()]

        assert await events(since="2026-03-01") == ["launch", "ready"]  # a date: its midnight UTC
        assert await events(since="2026-03-02") == []
        assert await events(until="2026-03-01T12:00") == []  # 12:00 UTC, not local time
        assert await events(until="2026-03-01T12:00:01") == ["launch", "ready"]
        assert await events(until="2026-03-01T13:00+02:00") == []  # 11:00 UTC
        assert await events(since="2026-03-01T12:00", until="2026-03-01T12:00:00.000001") == [
            "launch",
            "ready",
        ]

        async def dollars(**params: str) -> float:
            r = await client.get("/admin/costs", headers=AUTH, params=params)
            assert r.status_code == 200, (params, r.text)
            return sum(row["dollars"] for row in r.json())

        whole_hour = await dollars(since="2026-03-01T12:00:00Z", until="2026-03-01T13:00:00Z")
        assert whole_hour == pytest.approx(3.6)
        assert await dollars(since="2026-03-01T12:00", until="2026-03-01T13:00") == whole_hour
        assert await dollars(since="2026-03-01T12:30", until="2026-03-01") == 0  # empty range
        assert await dollars(since="2026-03-01T12:30") == pytest.approx(1.8)
        r = await client.get("/admin/costs", headers=AUTH, params={"since": "2026-03-01", "format": "csv"})
        assert r.status_code == 200 and r.text.startswith("model,dollars")

        for path in ("/admin/events", "/admin/costs"):
            for name in ("since", "until"):
                r = await client.get(path, headers=AUTH, params={name: "2026-13-01"})
                assert r.status_code == 400, (path, name)
                assert r.json()["error"]["param"] == f"query.{name}"
                assert r.json()["error"]["type"] == "invalid_request_error"


async def test_patch_of_an_unlisted_model_is_kept_across_restarts(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path, MODELS, allow_unlisted_models=True)
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (_, client):
        r = await client.patch("/admin/models/org/unlisted", headers=AUTH, json={"priority": 3})
        assert r.status_code == 200 and r.json()["priority"] == 3
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (_, client):
        one = (await client.get("/admin/models/org/unlisted", headers=AUTH)).json()
        assert (one["priority"], one["reference_priority"]) == (3, 0)
        r = await client.patch("/admin/models/org/unlisted", headers=AUTH, json={"keep_hot_seconds": 5})
        assert (r.json()["priority"], r.json()["keep_hot_seconds"]) == (3, 5)
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (_, client):
        one = (await client.get("/admin/models/org/unlisted", headers=AUTH)).json()
        assert (one["priority"], one["keep_hot_seconds"]) == (3, 5)


async def test_reset_lists_only_what_it_stopped(tmp_path: Path) -> None:
    """A model being taken over (draining for its last request) when the reset comes: the
    answer names a model only if its engine or its start was stopped."""
    models = {"low": {"priority": 0}, "mid": {"priority": 1}}
    with serve_in_thread(make_app(chunk_delay=0.5)) as slow_stub:  # a 2-second stream
        provider = FakeProvider(endpoint=slow_stub, capacity_gpus=1)
        settings = make_settings(tmp_path, models, drain_seconds=30)
        async with running_gateway(settings, provider) as (app, client):
            low = {**CHAT_BODY, "model": "low"}
            assert (await client.post("/v1/chat/completions", json=low)).status_code == 200
            streaming = asyncio.create_task(client.post("/v1/chat/completions", json={**low, "stream": True}))
            mid = asyncio.create_task(client.post("/v1/chat/completions", json={**low, "model": "mid"}))
            controller = app.state.controller
            for _ in range(200):
                if controller.phase("low") == "draining":
                    break
                await asyncio.sleep(0.01)
            assert controller.phase("low") == "draining" and controller.phase("mid") == "launching"
            r = await client.post("/admin/reset", headers=AUTH)
            assert r.status_code == 200
            still_running = {ref.data["model"] for ref in provider.running.values()}
            assert "mid" in r.json()["stopped"]  # its start was cancelled
            assert set(r.json()["stopped"]) == {"low", "mid"} - still_running
            await asyncio.gather(streaming, mid, return_exceptions=True)
