"""An engine that dies while serving: the client gets an error event and a closed stream, the
deployment is marked failed, and the next request starts a new engine. Real processes: the
LocalProvider runs the stub engine, the gateway is served by uvicorn."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from tasks.local import LocalConfig, LocalProvider
from tasks.procs import group_members
from tests.conftest import CHAT_BODY, make_settings
from tests.stub_upstream import serve_in_thread

STUB = Path(__file__).parents[1] / "stub_upstream.py"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, object]]:
    command = f"{sys.executable} {STUB} --port {{port}} --served-name {{served_name}} --chunk-delay 0.5"
    provider = LocalProvider(
        LocalConfig(
            engine_command=command, gpu_ids=("0",), log_dir=tmp_path / "engines", stop_grace_seconds=5
        )
    )
    app = create_app(make_settings(tmp_path), provider=provider)
    with serve_in_thread(app) as url:
        yield url, app


def engine_group(app: object) -> int:
    store = app.state.store  # type: ignore[attr-defined]
    [dep] = [d for d in store.deployments(model="org/chat") if d.state == "ready"]
    return int(json.loads(dep.handle)["data"]["pgid"])


def test_engine_killed_mid_stream(gateway: tuple[str, object]) -> None:
    url, app = gateway
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=CHAT_BODY).status_code == 200  # cold start
        pgid = engine_group(app)
        events = []
        with client.stream("POST", "/v1/chat/completions", json={**CHAT_BODY, "stream": True}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            events.append(first)
            os.killpg(pgid, signal.SIGKILL)  # the engine dies in the middle of the stream
            events.extend(line for line in lines if line.startswith("data: "))
        assert "Hello" in events[0]
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "engine_error"  # an error event, then the stream closed
        assert "data: [DONE]" not in events

        store = app.state.store  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            store.events(kind="engine-failed")
            and [d.state for d in store.deployments(model="org/chat")] == ["failed"]
        ):
            time.sleep(0.05)  # the runner ends in the background after the stream's error
        [failed] = store.events(kind="engine-failed")
        assert "died while serving" in failed.message
        assert [d.state for d in store.deployments(model="org/chat")] == ["failed"]
        assert group_members(pgid) == []

        # The next request starts a new engine.
        again = client.post("/v1/chat/completions", json=CHAT_BODY)
        assert again.status_code == 200
        assert [d.state for d in store.deployments(model="org/chat")] == ["ready", "failed"]
