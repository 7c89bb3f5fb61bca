from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.clock import Clock, system_clock
from gateway.config.settings import Settings
from tasks.provider import Provider
from tests import pg
from tests.stub_upstream import make_app, serve_in_thread

# Nothing in the suite may reach a SkyPilot API server by accident.
os.environ.setdefault("SKYPILOT_API_SERVER_ENDPOINT", "http://127.0.0.1:9")


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# A run ended by SIGTERM (`timeout`, a cancelled CI job) tears down like Ctrl-C: session fixtures
# still stop the servers they started (PostgreSQL, the stub upstream) instead of leaking them.
signal.signal(signal.SIGTERM, _interrupted)
for key in [k for k in os.environ if k.startswith("LLMGW_")]:
    del os.environ[key]  # a developer's own settings must not change test results


@pytest.fixture(scope="session")
def stub_url() -> Iterator[str]:
    with serve_in_thread(make_app()) as url:
        yield url


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresServer]:
    """One PostgreSQL server for the session (tests/pg.py). Missing PostgreSQL is a failure,
    not a skip: `make test` installs it."""
    bindir = pg.find_bin()
    if bindir is None:
        pytest.fail(pg.INSTALL_HINT)
    server = pg.start(bindir)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'gw.db'}"
    server: pg.PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


ADMIN_TOKEN = "test-admin-token-0123456789"


def write_reference(tmp_path: Path, models: dict[str, Any]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model_reference.json"
    path.write_text(json.dumps(models))
    return path


def make_settings(tmp_path: Path, models: dict[str, Any] | None = None, **overrides: Any) -> Settings:
    models = models if models is not None else {"org/chat": {}, "pinned": {"priority": 2}}
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "model_reference": write_reference(tmp_path, models),
        "local": {"gpu_ids": ["0"]},
        "reaper_interval_seconds": 3600,  # tests call tick() themselves
        "usage": {"flush_seconds": 3600},  # tests flush usage themselves (tick() does too)
        "after_hours": None,  # tests that want it set it
        "admin_token": ADMIN_TOKEN,
        # The suite's requests carry no API key; the key tests (tests/api/test_client_keys.py)
        # pass client_auth="keys".
        "client_auth": "open",
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_gateway(
    settings: Settings, provider: Provider, clock: Clock = system_clock
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings, provider=provider, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            yield app, client


CHAT_BODY: dict[str, Any] = {"model": "org/chat", "messages": [{"role": "user", "content": "hi"}]}
