"""Every error a client can get is OpenAI's envelope, 500 included: no traceback and no text of
the internal exception in the body, a request id that is also in the log with the traceback."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.api.deps import get_controller
from gateway.api.errors import install_error_handlers
from tests.conftest import ADMIN_TOKEN, make_settings, running_gateway
from tests.fakes import FakeProvider

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SECRET_DETAIL = "connection string postgres://user:hunter2@db"


def assert_internal_error(response: httpx.Response, caplog: pytest.LogCaptureFixture) -> str:
    assert response.status_code == 500
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("api_error", "internal_error")
    assert SECRET_DETAIL not in response.text and "Traceback" not in response.text
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", request_id) and request_id in error["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, with the id
    return request_id


async def test_a_dependency_that_raises_is_a_500_envelope(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_controller() -> None:
        raise RuntimeError(SECRET_DETAIL)

    async with running_gateway(make_settings(tmp_path), FakeProvider()) as (app, client):
        app.dependency_overrides[get_controller] = broken_controller
        r = await client.get("/admin/info", headers=AUTH)
        assert_internal_error(r, caplog)
        assert SECRET_DETAIL in caplog.text  # for the operator, not the client
        r = await client.get("/v1/models")
        assert_internal_error(r, caplog)


async def test_an_error_on_the_openai_front_is_a_500_envelope(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenAI POST routes are answered in front of FastAPI's middleware: they have their own
    catch-all."""

    def broken_resolve(model: str) -> None:
        raise RuntimeError(SECRET_DETAIL)

    async with running_gateway(make_settings(tmp_path), FakeProvider()) as (app, client):
        monkeypatch.setattr(app.state.catalog, "resolve", broken_resolve)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            r = await client.post(path, json={"model": "m", "messages": []})
            assert_internal_error(r, caplog)
        assert SECRET_DETAIL in caplog.text
        monkeypatch.undo()
        assert (await client.get("/health")).status_code == 200  # the gateway goes on


async def test_a_database_error_is_a_500_envelope(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_gateway(make_settings(tmp_path), FakeProvider()) as (app, client):
        with app.state.store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE events")
        r = await client.get("/admin/events", headers=AUTH)
        assert_internal_error(r, caplog)
        assert "no such table" not in r.text and "SELECT" not in r.text
        assert (await client.get("/health")).status_code == 200  # the gateway goes on


def app_with(route: str, body: AsyncIterator[bytes], media_type: str) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get(route)
    async def stream() -> StreamingResponse:
        return StreamingResponse(body, media_type=media_type)

    @app.get("/depends")
    async def depends(_: None = Depends(lambda: 1 / 0)) -> JSONResponse:
        return JSONResponse({})

    return app


async def failing_body() -> AsyncIterator[bytes]:
    yield b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    raise RuntimeError(SECRET_DETAIL)


async def test_an_error_inside_an_event_stream_ends_it_with_an_error_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    app = app_with("/stream", failing_body(), "text/event-stream")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.get("/stream")
        assert (await client.get("/depends")).json()["error"]["code"] == "internal_error"
    assert r.status_code == 200  # sent before the error
    first, last = r.text.split("\n\n")[:2]
    assert first == 'data: {"choices":[{"delta":{"content":"Hi"}}]}'
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == "internal_error" and SECRET_DETAIL not in r.text
    request_id = re.search(r"request id ([0-9a-f]{16})", error["message"])
    assert request_id and request_id.group(1) in caplog.text


async def test_an_error_inside_another_started_response_cuts_it() -> None:
    app = app_with("/bytes", failing_body(), "application/octet-stream")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        with pytest.raises(RuntimeError):  # the server closes the connection: the client sees a cut body
            await client.get("/bytes")
