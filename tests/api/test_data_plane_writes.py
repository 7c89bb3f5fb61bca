"""Through the gateway: usage and last-used times reach the database through the writer, and a
write that fails is done again at the next flush."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text

from tests.conftest import CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider


async def test_a_failed_last_used_flush_is_written_at_the_next_one(tmp_path: Path, stub_url: str) -> None:
    async with running_gateway(make_settings(tmp_path), FakeProvider(endpoint=stub_url)) as (app, client):
        store, controller = app.state.store, app.state.controller
        assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE models RENAME TO models_away"))
        await controller.flush_activity()  # fails: no table
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE models_away RENAME TO models"))
        model = store.get_model("org/chat")
        assert model is not None and model.last_used_at is None
        await controller.flush_activity()
        model = store.get_model("org/chat")
        assert model is not None and model.last_used_at is not None
        dep = store.get_deployment(controller.live("org/chat").deployment_id)
        assert dep is not None and dep.last_used_at is not None


async def test_usage_is_flushed_by_its_own_task_not_only_by_the_reaper(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path, usage={"flush_seconds": 0.05})
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (app, client):
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        for _ in range(100):  # the flush task runs every 50 ms
            if app.state.store.usage_count(model="org/chat") == 3:
                break
            await asyncio.sleep(0.02)
        assert app.state.store.usage_count(model="org/chat") == 3
        [row] = app.state.store.usage_minutes(model="org/chat")
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (3, 15, 12)  # 5 + 4 each
