"""What a client sees when things go wrong, against the real gateway and a real vLLM: a start
cancelled by an admin, a client that hangs up while its model starts or while it streams, and a
model whose engine cannot start."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.e2e.conftest import GatewayProcess, start_gateway, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    broken = {"broken": {"path": str(Path("/nonexistent/weights"))}}
    gw = start_gateway(tmp_path_factory.mktemp("faults"), broken, keep_hot_seconds=600)
    try:
        yield gw
    finally:
        try:
            gw.terminate(timeout=60)
        finally:
            gw.kill_everything()


def model(gw: GatewayProcess, model_id: str) -> dict:
    return httpx.get(f"{gw.base_url}/admin/models/{model_id}", headers=AUTH, timeout=10).json()


def hang_up_after(gw: GatewayProcess, body: dict, seconds: float) -> bytes:
    """Send a request, read for `seconds`, then close the connection (an SDK that timed out)."""
    host, port = gw.base_url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    got = b""
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got += sock.recv(65536)
    return got


def test_an_unload_during_the_start_answers_its_waiters_503(gateway: GatewayProcess) -> None:
    answers: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT, timeout=120)
        )
    )
    waiter.start()
    assert wait_until(lambda: model(gateway, "tiny-llama")["state"] in ("launching", "loading"), 30)
    unload = httpx.post(f"{gateway.base_url}/admin/models/tiny-llama/unload", headers=AUTH, timeout=120)
    assert unload.status_code == 200 and unload.json()["stopped"] is True
    waiter.join(60)
    [answer] = answers
    assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
    assert answer.json()["error"]["code"] == "start_cancelled"
    assert not gateway.live_engine_groups()  # the engine it had started is gone


def test_a_client_that_hangs_up_leaves_the_queue_and_the_count(gateway: GatewayProcess) -> None:
    # Waiting for a cold start, then gone: it leaves the queue at once, and is never sent.
    hang_up_after(gateway, CHAT, 3)
    assert wait_until(lambda: model(gateway, "tiny-llama")["waiting"] == 0, 5)
    assert model(gateway, "tiny-llama")["state"] in ("launching", "loading")
    assert wait_until(lambda: model(gateway, "tiny-llama")["state"] == "ready", 180)
    assert model(gateway, "tiny-llama")["in_flight"] == 0
    # Hung up in the middle of a long stream: no longer counted in flight.
    long = {**CHAT, "stream": True, "max_tokens": 200, "ignore_eos": True}
    got = hang_up_after(gateway, long, 0.5)
    assert b"200 OK" in got and b"data: " in got
    assert wait_until(lambda: model(gateway, "tiny-llama")["in_flight"] == 0, 10)
    # A chat after all that is served normally.
    assert httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def test_a_broken_model_tells_clients_little_and_admins_why(gateway: GatewayProcess) -> None:
    # One GPU slot: tiny-llama gives it back first (else the answer is 503, no capacity).
    httpx.post(f"{gateway.base_url}/admin/models/tiny-llama/unload", headers=AUTH, timeout=120)
    first = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json={**CHAT, "model": "broken"}, timeout=300
    )
    assert first.status_code == 502
    error = first.json()["error"]
    assert error["code"] == "engine_start_failed" and "/admin/failures" in error["message"]
    again = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json={**CHAT, "model": "broken"}, timeout=30
    )
    assert again.status_code == 400 and again.json()["error"]["code"] == "model_failed"
    for answer in (first.text, again.text):  # no engine log, paths or stack traces for clients
        assert "nonexistent" not in answer and "Traceback" not in answer and "last lines" not in answer
    [failure] = [
        f
        for f in httpx.get(f"{gateway.base_url}/admin/failures", headers=AUTH).json()
        if f["model"] == "broken"
    ]
    assert "last lines of" in failure["error"]  # the engine log tail is for admins
