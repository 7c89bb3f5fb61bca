"""Benchmark 3: a thundering herd on a cold model.

The real gateway process with the local provider, whose "engine" is the fast stub answering
/health 200 only after `READY_AFTER` seconds. `N` requests arrive at once for the stopped model:
exactly one launch must happen (single-flight), all must be answered 200, and the gateway's peak
resident set (VmHWM) is compared with its resident set at rest just before the herd.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from typing import Any

import uvloop

from bench import load
from bench.gateway_proc import start_gateway
from bench.http_client import Reply, post_request
from bench.procs import proc_status_kb
from bench.report import BenchResult, Row, Target
from bench.stats import percentile
from bench.suite import Context

NAME = "herd"
MODEL = "herd-model"
READY_AFTER = 2.0
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
ENGINE_COMMAND = (
    f"{sys.executable} -m bench.stub_server --port {{port}} --ready-after {READY_AFTER} "
    "--served-model-name {served_name}"
)


def run(ctx: Context) -> BenchResult:
    n = ctx.pick(1000, 200)
    with ExitStack() as stack:
        gateway = start_gateway(
            ctx.workdir / "gateway",
            {MODEL: {}},
            max_waiting_requests=2000,
            local={"gpu_ids": ["0"], "engine_command": ENGINE_COMMAND, "stop_grace_seconds": 5},
        )
        stack.callback(gateway.stop)
        rss_before = proc_status_kb(gateway.pid, "VmRSS") or 0
        hwm_before = proc_status_kb(gateway.pid, "VmHWM") or 0
        wall0, perf0 = time.time(), time.perf_counter()
        replies = uvloop.run(
            load.burst(
                gateway.base_url,
                post_request(gateway.base_url, "/v1/chat/completions", BODY),
                n=n,
                timeout=120,
            )
        )
        hwm_after = proc_status_kb(gateway.pid, "VmHWM") or 0
        store = gateway.store()
        try:
            deployments = store.deployments(model=MODEL)
            launches = len(store.events(model=MODEL, kind="launch"))
        finally:
            store.close()
    ok = [r for r in replies if isinstance(r, Reply) and r.status == 200]
    statuses: dict[str, int] = {}
    for r in replies:
        key = str(r.status) if isinstance(r, Reply) else type(r).__name__
        statuses[key] = statuses.get(key, 0) + 1
    raw: dict[str, Any] = {
        "requests": n,
        "statuses": statuses,
        "deployments": len(deployments),
        "launch_events": launches,
        "rss_before_kb": rss_before,
        "hwm_before_kb": hwm_before,
        "hwm_after_kb": hwm_after,
        "latency_p50_s": round(percentile([r.latency for r in ok], 50), 3),
        "latency_max_s": round(max((r.latency for r in ok), default=float("nan")), 3),
    }
    ready_at = deployments[0].ready_at if deployments else None
    pending_at = deployments[0].pending_at if deployments else None
    if ready_at and pending_at and ok:
        last_answer = wall0 + (max(r.ended for r in ok) - perf0)  # perf_counter -> wall clock
        raw["engine_cold_start_s"] = round((ready_at - pending_at).total_seconds(), 3)
        raw["last_answer_after_ready_ms"] = round((last_answer - ready_at.timestamp()) * 1000, 1)
    rows = [
        Row(
            NAME,
            f"launches for {n} simultaneous cold requests",
            float(raw["deployments"]),
            baseline="single-flight",
            subject=f"{launches} launch event(s)",
            target=Target("==", 1),
        ),
        Row(
            NAME,
            "answered 200",
            float(len(ok)),
            baseline=f"{n} sent",
            subject=", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
            target=Target("==", n),
        ),
        Row(
            NAME,
            "last answer after the engine was ready",
            raw.get("last_answer_after_ready_ms", float("nan")),
            "ms",
            baseline=f"engine ready after {raw.get('engine_cold_start_s', 'n/a')} s",
            subject=f"{len(ok)} queued answers",
            note=f"herd latency p50 {raw['latency_p50_s']} s, max {raw['latency_max_s']} s",
        ),
        Row(
            NAME,
            "gateway peak RSS (VmHWM)",
            hwm_after / 1024,
            "MB",
            baseline=f"at rest {rss_before / 1024:.0f} MB",
            subject=f"+{(hwm_after - rss_before) / 1024:.0f} MB for the herd",
            target=Target("<", 300, "MB"),
        ),
    ]
    return BenchResult(NAME, rows=rows, raw=raw)
