"""Replicas with real vLLM engines on two local GPU slots: sustained load brings a second
engine up, traffic reaches both, and when the load stops the model goes back to one replica,
then to none after its keep-hot time. The load is light (two clients, a few tokens each): two
CPU engines share this machine's cores."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ADMIN_TOKEN
from tests.e2e.conftest import GatewayProcess, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL = "tiny-hot"
HOT = {
    "replicas": {"min": 1, "max": 2},
    "target_in_flight_per_replica": 1,
    "scale_up_seconds": 2,
    "scale_down_seconds": 6,
    "keep_hot_seconds": 20,
}
# vLLM's CPU build pins each engine's threads to the cores it picks ("auto"): both engines pick
# the same core, and the second one, starting next to the first one serving, does not start.
UNPINNED = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
CLIENTS = 2  # in flight at once: 2 per replica > target 1 on one, = target on two


def chat(client: httpx.Client) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    return client.post("/v1/chat/completions", json=body).status_code


class Load:
    """`CLIENTS` clients sending one request after another until stopped."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.gw.base_url, timeout=300) as client:
            while not self.stop.is_set():
                self.statuses.append(chat(client))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


def status(gw: GatewayProcess) -> dict[str, Any]:
    reply = httpx.get(f"{gw.base_url}/admin/models/{MODEL}", headers=AUTH, timeout=30)
    reply.raise_for_status()
    data: dict[str, Any] = reply.json()
    return data


def ready(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [r for r in status(gw)["replicas"] if r["state"] == "ready"]


def engine_log_requests(gw: GatewayProcess, deployment_id: str) -> int:
    """Chat completions the engine itself logged (vLLM's access log), from its own log file."""
    dep = gw.store().get_deployment(deployment_id)
    assert dep is not None and dep.handle
    log = Path(json.loads(dep.handle)["data"]["log"])
    return log.read_text(errors="replace").count("POST /v1/chat/completions")


def test_second_replica_under_load_then_back_to_one_then_none(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: GatewayProcess = gateway_factory(
        models={MODEL: HOT}, local={"gpu_ids": ["0", "1"], "env": UNPINNED}, reaper_interval_seconds=1
    )
    with httpx.Client(base_url=gw.base_url, timeout=600) as client:
        assert chat(client) == 200  # the cold start of the first replica
    [first] = ready(gw)
    with Load(gw) as load:
        started = time.monotonic()
        assert wait_until(lambda: len(ready(gw)) == 2, timeout=300, interval=0.5), json.dumps(status(gw))
        assert wait_until(lambda: all(r["requests"] > 0 for r in ready(gw)), timeout=120, interval=0.2)
        serving_after = time.monotonic() - started
        time.sleep(3)  # a few more requests over both
    assert load.statuses and set(load.statuses) == {200}, load.statuses
    replicas = {r["deployment_id"]: r for r in status(gw)["replicas"]}
    assert len(replicas) == 2 and all(r["requests"] > 0 for r in replicas.values())
    store = gw.store()
    slots = {tuple(json.loads(store.get_deployment(d).handle)["data"]["gpu_ids"]) for d in replicas}  # type: ignore[union-attr,arg-type]
    assert slots == {("0",), ("1",)}  # each engine on its own slot
    for deployment_id in replicas:  # the engines saw the requests, not only the gateway's counts
        assert engine_log_requests(gw, deployment_id) > 0
    [up] = [e for e in store.events(model=MODEL, kind="launch") if "replica requested" in e.message]
    print(
        f"\nsecond replica serving {serving_after:.1f}s after the load started; {len(load.statuses)} requests"
    )

    # The load is gone: back to one replica after scale_down_seconds, then none after keep-hot.
    assert wait_until(lambda: len(ready(gw)) == 1, timeout=60), status(gw)
    [down] = store.events(model=MODEL, kind="scale-down")
    assert down.deployment_id != first["deployment_id"]  # the newer one, as idle as the other, went
    assert wait_until(lambda: not status(gw)["replicas"], timeout=120), status(gw)
    [idle] = store.events(model=MODEL, kind="idle-stop")
    assert idle.deployment_id == first["deployment_id"]
    assert wait_until(lambda: not gw.live_engine_groups(), timeout=60)
    assert up.at <= down.at <= idle.at
