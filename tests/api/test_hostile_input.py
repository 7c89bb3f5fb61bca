"""Bad input never reaches an engine, and secrets never reach logs, the database or events."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider

BAD_NAMES = [
    "../etc/passwd",
    "org/../../x",
    "a b",
    "a\tb",
    'quo"te',
    "it's",
    "x;rm -rf /",
    "$(reboot)",
    "`id`",
    "a|b",
    "a&b",
    "a>b",
    "a" * 300,
    "mödel",
    "模型",
    "emoji🙂",
    "org/a/b",
    "/abs",
    "-flag",
    ".hidden",
    "a\nb",
    "\x00",
]


@pytest.mark.parametrize("unlisted", [False, True])
async def test_invalid_model_names_are_404_and_start_nothing(
    tmp_path: Path, stub_url: str, unlisted: bool
) -> None:
    provider = FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, allow_unlisted_models=unlisted)
    async with running_gateway(settings, provider) as (_, client):
        for name in BAD_NAMES:
            for stream in (False, True):
                r = await client.post(
                    "/v1/chat/completions", json={**CHAT_BODY, "model": name, "stream": stream}
                )
                assert r.status_code == 404, name
                assert r.json()["error"]["code"] == "model_not_found"
    assert provider.launches == []


async def test_malformed_bodies_are_4xx_envelopes(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        cases = [
            (b"", 400),
            (b"{", 400),
            (b"null", 400),
            (b"[]", 400),
            (b'"text"', 400),
            (b"\xff\xfe", 400),
            (b'{"model": 5}', 400),
            (b'{"model": ["a"]}', 400),
            (b'{"model": null}', 400),
            (b'{"model": ""}', 400),
            (b'{"model": "org/chat", "stream": "true"}', 400),
            (b'{"model": "org/chat", "stream": 1}', 400),
            (b"x" * (10 * 1024 * 1024), 413),
        ]
        for body, status in cases:
            r = await client.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == status, body[:40]
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
    assert provider.launches == []


async def test_tokens_never_reach_logs_database_or_events(
    tmp_path: Path, stub_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hf_request, hf_settings = "hf_request_secret_123456", "hf_settings_secret_654321"
    provider = FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, hf_token=hf_settings)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with running_gateway(settings, provider) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT_BODY, headers={"X-HF-Token": hf_request})
        await client.post(
            "/v1/chat/completions", json={**CHAT_BODY, "stream": True}, headers={"X-HF-Token": "x"}
        )
        await client.post("/admin/models/pinned/load?wait=true", headers=auth)
        await client.get("/admin/info", headers=auth)
        await client.get("/admin/models", headers={"Authorization": "Bearer wrong-token"})
        await client.post("/admin/reset", headers=auth)
        events = " ".join(e.message for e in app.state.store.events())
        await app.state.reaper.tick(app.state.controller.clock())
    assert provider.launches[0].secrets == {"HF_TOKEN": hf_request}  # it did reach the engine
    database = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("gateway.db*"))
    for secret in (hf_request, hf_settings, ADMIN_TOKEN):
        assert secret not in caplog.text
        assert secret not in events
        assert secret.encode() not in database


async def test_client_keys_never_reach_logs_database_events_or_metrics(
    tmp_path: Path, stub_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = FakeProvider(endpoint=stub_url)
    settings = make_settings(tmp_path, client_auth="keys", usage={"raw_rows": True, "flush_seconds": 3600})
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with running_gateway(settings, provider) as (app, client):
        created = (await client.post("/admin/keys", headers=auth, json={"name": "k", "team": "t"})).json()
        key = created["key"]
        wrong = key[:-4] + "XXXX"  # a near miss, as a typo would be
        used = {"Authorization": f"Bearer {key}"}
        for body in (CHAT_BODY, {**CHAT_BODY, "stream": True}, {**CHAT_BODY, "model": "nope"}):
            await client.post("/v1/chat/completions", json=body, headers=used)
        await client.post(
            "/v1/chat/completions", json=CHAT_BODY, headers={"Authorization": f"Bearer {wrong}"}
        )
        await client.get("/v1/models", headers=used)
        listed = (await client.get("/admin/keys", headers=auth)).text
        await client.delete(f"/admin/keys/{created['id']}", headers=auth)
        await client.post("/v1/chat/completions", json=CHAT_BODY, headers=used)  # revoked: 401
        await client.get("/admin/costs?group_by=key", headers=auth)
        metrics = (await client.get("/metrics")).text
        await app.state.usage.flush()
        await app.state.reaper.tick(app.state.controller.clock())
        events = " ".join(e.message for e in app.state.store.events())
        assert [r.api_key_id for r in app.state.store.usage()][:2] == [created["id"]] * 2
    database = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("gateway.db*"))
    for secret in (key, wrong, key[len("sk-gw-") :]):
        for text in (caplog.text, events, metrics, listed):
            assert secret not in text
        assert secret.encode() not in database
