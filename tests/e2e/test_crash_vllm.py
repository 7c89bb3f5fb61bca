"""kill -9 the gateway during a cold start and while serving: on restart its engine is adopted
(the local provider takes a live engine back), never duplicated nor orphaned, and the events say so."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import httpx

from tests.e2e.conftest import GatewayProcess, start_gateway, wait_until

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def crash(gw: GatewayProcess) -> None:
    gw.process.send_signal(signal.SIGKILL)  # by pid: the gateway only, its engines live on
    gw.process.wait(timeout=30)


def restart(tmp_path: Path) -> GatewayProcess:
    """A new gateway on the same settings, database and data directory."""
    return start_gateway(tmp_path, reuse=True)


def test_kill_9_during_cold_start_and_while_serving(tmp_path: Path) -> None:
    gateways: list[GatewayProcess] = []
    try:
        first = start_gateway(tmp_path)
        gateways.append(first)
        threading.Thread(target=lambda: _quiet_post(first.base_url), daemon=True).start()
        store = first.store()
        assert wait_until(lambda: [d.state for d in store.deployments()] == ["loading"], timeout=60)
        [orphan] = first.engine_groups()
        crash(first)
        assert first.live_engine_groups() == [orphan]  # the engine outlived the gateway

        second = restart(tmp_path)
        gateways.append(second)
        [event] = store.events(kind="reconciled")
        assert "adopted loading" in event.message  # its cold start goes on, not thrown away
        with httpx.Client(timeout=300) as client:
            assert client.post(f"{second.base_url}/v1/chat/completions", json=BODY).status_code == 200
        assert second.live_engine_groups() == [orphan]  # the same engine: no second launch
        assert len(store.events(kind="launch")) == 1
        crash(second)

        third = restart(tmp_path)
        gateways.append(third)
        reconciled = store.events(kind="reconciled")
        assert len(reconciled) == 2 and "adopted healthy" in reconciled[-1].message
        with httpx.Client(timeout=300) as client:
            assert client.post(f"{third.base_url}/v1/chat/completions", json=BODY).status_code == 200
        assert third.live_engine_groups() == [orphan]  # exactly one engine: never duplicated
        assert [d.state for d in store.deployments()] == ["ready"]
    finally:
        for gw in gateways:
            try:
                gw.terminate(timeout=60)  # the live one stops its engine (and its private TMPDIR)
            finally:
                gw.kill_everything()


def _quiet_post(base_url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the gateway is killed under this request
        httpx.post(f"{base_url}/v1/chat/completions", json=BODY, timeout=300)
