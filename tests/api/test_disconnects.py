"""Clients that go away, through a real HTTP server (uvicorn): nothing stays counted or queued.

The gateway runs under uvicorn in a thread with the fake provider; clients are raw sockets that
send a request and close the connection, which is what the server sees of an OpenAI SDK that
timed out."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.app import create_app
from tests.conftest import CHAT_BODY, make_settings
from tests.fakes import FakeProvider
from tests.stub_upstream import make_app, serve_in_thread


def send_and_hang_up(base_url: str, body: dict, *, after: float) -> None:
    """POST a chat request, read nothing, close the connection after `after` seconds."""
    host, port = base_url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        time.sleep(after)


def until(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_a_cold_waiter_that_hangs_up_leaves_the_queue(tmp_path: Path) -> None:
    stub = make_app()
    with serve_in_thread(stub) as engine:
        provider = FakeProvider(endpoint=engine, ready_delay=3)
        app = create_app(make_settings(tmp_path), provider=provider)
        with serve_in_thread(app) as gateway:
            controller = app.state.controller
            send_and_hang_up(gateway, CHAT_BODY, after=0.3)  # waits for the cold start, then goes
            # It leaves the queue when it goes, not when the start ends; the start goes on.
            assert until(lambda: controller.waiting("org/chat") == 0, seconds=1.5)
            assert controller.phase("org/chat") == "loading"
            assert until(lambda: controller.phase("org/chat") == "ready")
            # Its request was never sent to the engine: nothing is in flight, nothing was counted.
            assert controller.activity.in_flight("org/chat") == 0
            time.sleep(0.2)
            assert stub.state.counters["requests"] == 0


def test_a_stream_cut_short_by_its_client_is_not_left_in_flight(tmp_path: Path) -> None:
    with serve_in_thread(make_app(chunk_delay=0.5)) as engine:  # a stream of ~2 s
        provider = FakeProvider(endpoint=engine)
        app = create_app(make_settings(tmp_path, keep_hot_seconds=0), provider=provider)
        with serve_in_thread(app) as gateway:
            controller = app.state.controller
            assert httpx.post(f"{gateway}/v1/chat/completions", json=CHAT_BODY, timeout=10).status_code == 200
            send_and_hang_up(gateway, {**CHAT_BODY, "stream": True}, after=0.3)
            assert until(lambda: controller.activity.in_flight("org/chat") == 0, seconds=1.5)
            # So idle teardown sees it idle and stops it.
            loop = controller.runners()[0].task.get_loop()
            asyncio.run_coroutine_threadsafe(app.state.reaper.tick(controller.clock()), loop).result(5)
            assert until(lambda: controller.phase("org/chat") == "stopped")
            assert len(provider.stops) == 1
