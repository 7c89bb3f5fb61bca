"""Benchmark 1: what the gateway adds to a hot, non-streamed chat completion.

The fast stub upstream is called directly (the baseline) and through the real gateway process
(a reference entry with `endpoint`, so no engine is launched), and through the LiteLLM proxy when
`.venv-litellm` exists.

(a) One request at a time, each subject interleaved round by round with its own direct
baseline: added p50 and p99 back to back, and again with `IDLE_GAP` between requests (light
traffic: on these VMs an idle CPU is halted and waking it costs, once per hop).
(b) 32 connections in a closed loop, the subjects taking turns: requests per second, their
ratio, and the added p50. The gateway, the stub and the load generator share the machine's
cores, so (b) measures the whole system, not the gateway alone.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import uvloop

from bench import litellm_proc, load
from bench.gateway_proc import start_gateway
from bench.http_client import post_request
from bench.procs import cpu_seconds, stub_server
from bench.report import BenchResult, Row, Target
from bench.stats import median, summary_ms
from bench.suite import Context, log

NAME = "proxy_overhead"
MODEL = "stub"
PATH = "/v1/chat/completions"
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
}
CONCURRENCY = 32
IDLE_GAP = 0.020
# LiteLLM measured elsewhere at concurrency 32: used when it is not installed here.
LITELLM_REFERENCE_RPS = 75.0
TARGET_RPS_RATIO = 20.0


@dataclass
class Subject:
    """A server the load goes to: the stub itself, the gateway or LiteLLM."""

    name: str
    url: str
    pid: int

    @property
    def request(self) -> bytes:
        return post_request(self.url, PATH, BODY)


def run(ctx: Context) -> BenchResult:
    rounds = ctx.pick(3000, 300)
    few_rounds = ctx.pick(500, 100)  # with idle gaps, and for LiteLLM (~20 ms a request)
    limit = ctx.pick(60.0, 20.0)
    with ExitStack() as stack:
        stub = stub_server(ctx.workdir)
        stack.callback(stub.stop)
        gateway = start_gateway(ctx.workdir / "gateway", {MODEL: {"endpoint": stub.base_url}})
        stack.callback(gateway.stop)
        direct = Subject("direct", stub.base_url, stub.pid)
        proxied = Subject("gateway", gateway.base_url, gateway.pid)
        litellm, litellm_info = start_litellm(ctx, stack, stub.base_url)
        sequential = {
            "back_to_back": measure_sequential([direct, proxied], rounds=rounds, time_limit=limit),
            "idle_gap": measure_sequential(
                [direct, proxied], rounds=few_rounds, time_limit=limit, pause=IDLE_GAP
            ),
        }
        if litellm is not None:
            sequential["litellm"] = measure_sequential([direct, litellm], rounds=few_rounds, time_limit=limit)
        subjects = [direct, proxied] + ([litellm] if litellm else [])
        concurrent = measure_concurrent(subjects, reps=ctx.pick(3, 1), seconds=ctx.pick(5.0, 2.0))
    result = BenchResult(NAME, raw={"sequential": sequential, "concurrent": concurrent, **litellm_info})
    result.rows = rows(sequential, concurrent, litellm_measured=litellm is not None)
    if litellm is None:
        result.rows[-1].note = litellm_info["litellm_skipped"]
    return result


def start_litellm(ctx: Context, stack: ExitStack, upstream: str) -> tuple[Subject | None, dict[str, Any]]:
    """LiteLLM in front of the same stub when `.venv-litellm` exists; else None and why."""
    if not litellm_proc.installed():
        why = (
            f"LiteLLM not installed ({litellm_proc.LITELLM_BIN} missing): skipped; "
            "scripts/setup_litellm.sh installs it"
        )
        log.info("%s", why)
        return None, {"litellm_skipped": why}
    t0 = time.monotonic()
    server = litellm_proc.start_litellm(ctx.workdir / "litellm", MODEL, upstream)
    stack.callback(server.stop)
    info = {"litellm_version": litellm_proc.version(), "litellm_start_s": round(time.monotonic() - t0, 1)}
    return Subject("litellm", server.base_url, server.pid), info


def measure_sequential(
    targets: list[Subject], *, rounds: int, time_limit: float, pause: float = 0.0
) -> dict[str, Any]:
    requests = {t.name: (t.url, t.request) for t in targets}
    cpu0 = {t.name: cpu_seconds(t.pid) or 0.0 for t in targets}
    series = uvloop.run(load.interleaved(requests, rounds=rounds, time_limit=time_limit, pause=pause))
    out: dict[str, Any] = {}
    for t in targets:
        s = series[t.name]
        cpu = (cpu_seconds(t.pid) or 0.0) - cpu0[t.name]
        out[t.name] = {
            **summary_ms(s.latencies()),
            "errors": s.errors,
            # includes the warm-up requests and whatever the server does in the background
            "server_cpu_ms_per_request": round(1000 * cpu / max(len(s.replies), 1), 3),
        }
    return out


def measure_concurrent(targets: list[Subject], *, reps: int, seconds: float) -> dict[str, Any]:
    """`reps` turns; in each, every target gets the same closed loop, in a rotated order."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for rep in range(reps):
        shift = rep % len(targets)
        for target in targets[shift:] + targets[:shift]:
            cpu0, t0 = cpu_seconds(target.pid) or 0.0, time.perf_counter()
            res = uvloop.run(
                load.closed_loop(target.url, target.request, connections=CONCURRENCY, seconds=seconds)
            )
            cpu = (cpu_seconds(target.pid) or 0.0) - cpu0
            wall = time.perf_counter() - t0
            runs[target.name].append(
                {
                    "rps": round(res.rps, 1),
                    "errors": res.errors,
                    **summary_ms(res.latencies),
                    "server_cpu_cores": round(cpu / wall, 2),
                    "server_cpu_ms_per_request": round(1000 * cpu / max(res.completed, 1), 3),
                }
            )
    return {"connections": CONCURRENCY, "seconds": seconds, "cpus": os.cpu_count(), "runs": runs}


def _per_turn(conc: dict[str, Any], name: str, key: str) -> list[float]:
    return [float(r[key]) for r in conc["runs"].get(name, [])]


def _paired(conc: dict[str, Any], subject: str, baseline: str, key: str, *, ratio: bool) -> float:
    """Median over turns of subject/baseline (or subject - baseline) measured in the same turn."""
    pairs = zip(_per_turn(conc, subject, key), _per_turn(conc, baseline, key), strict=True)
    return median([(a / b if b else float("nan")) if ratio else a - b for a, b in pairs])


def rows(seq: dict[str, Any], conc: dict[str, Any], *, litellm_measured: bool) -> list[Row]:
    return sequential_rows(seq) + concurrent_rows(conc, litellm_measured=litellm_measured)


def sequential_rows(seq: dict[str, Any]) -> list[Row]:
    plan = [
        ("back_to_back", "gateway", 50, "", Target("<=", 1.0, "ms")),
        ("back_to_back", "gateway", 99, "", Target("<=", 3.0, "ms")),
        ("idle_gap", "gateway", 50, f", {IDLE_GAP * 1000:.0f} ms apart", None),
        ("idle_gap", "gateway", 99, f", {IDLE_GAP * 1000:.0f} ms apart", None),
        ("litellm", "litellm", 50, " (LiteLLM)", None),
    ]
    out = []
    for run_name, name, q, label, target in plan:
        if run_name not in seq:
            continue
        d, s, key = seq[run_name]["direct"], seq[run_name][name], f"p{q}_ms"
        out.append(
            Row(
                NAME,
                f"c=1 added latency p{q}{label}",
                s[key] - d[key],
                "ms",
                baseline=f"direct {d[key]:.2f} ms",
                subject=f"{name} {s[key]:.2f} ms",
                target=target,
                note=_sequential_note(s, name, with_cpu=run_name != "idle_gap") if q == 50 else "",
            )
        )
    return out


def _sequential_note(s: dict[str, Any], name: str, *, with_cpu: bool) -> str:
    """Rounds and errors; the server's CPU per request only back to back, where its background
    work (reaper ticks, usage flushes) is a small share of the time."""
    note = f"{s['n']} interleaved rounds, {s['errors']} errors"
    return note + (f"; {name} CPU {s['server_cpu_ms_per_request']:.2f} ms/request" if with_cpu else "")


def concurrent_rows(conc: dict[str, Any], *, litellm_measured: bool) -> list[Row]:
    gw_rps = median(_per_turn(conc, "gateway", "rps"))
    turns = len(conc["runs"]["gateway"])
    out = [
        Row(
            NAME,
            f"c={CONCURRENCY} gateway RPS / direct RPS",
            _paired(conc, "gateway", "direct", "rps", ratio=True),
            "x",
            baseline=f"direct {median(_per_turn(conc, 'direct', 'rps')):,.0f} rps",
            subject=f"gateway {gw_rps:,.0f} rps",
            note=f"median of {turns} turns; {conc['cpus']} CPUs shared by gateway, stub and load "
            f"generator; gateway CPU {median(_per_turn(conc, 'gateway', 'server_cpu_ms_per_request')):.2f} "
            "ms/request",
        ),
        Row(
            NAME,
            f"c={CONCURRENCY} added latency p50",
            _paired(conc, "gateway", "direct", "p50_ms", ratio=False),
            "ms",
            baseline=f"direct {median(_per_turn(conc, 'direct', 'p50_ms')):.2f} ms",
            subject=f"gateway {median(_per_turn(conc, 'gateway', 'p50_ms')):.2f} ms",
        ),
    ]
    if litellm_measured:
        lt_rps = median(_per_turn(conc, "litellm", "rps"))
        lt_added = _paired(conc, "litellm", "direct", "p50_ms", ratio=False)
        out.append(
            Row(
                NAME,
                f"c={CONCURRENCY} gateway RPS / LiteLLM RPS",
                _paired(conc, "gateway", "litellm", "rps", ratio=True),
                "x",
                baseline=f"litellm {lt_rps:,.0f} rps, +{lt_added:.0f} ms p50",
                subject=f"gateway {gw_rps:,.0f} rps",
                target=Target(">=", TARGET_RPS_RATIO, "x"),
                note=f"LiteLLM (one worker) CPU "
                f"{median(_per_turn(conc, 'litellm', 'server_cpu_ms_per_request')):.2f} ms/request",
            )
        )
    else:
        out.append(
            Row(
                NAME,
                f"c={CONCURRENCY} gateway RPS / LiteLLM RPS",
                gw_rps / LITELLM_REFERENCE_RPS,
                "x",
                baseline=f"litellm {LITELLM_REFERENCE_RPS:.0f} rps (measured elsewhere)",
                subject=f"gateway {gw_rps:,.0f} rps",
                target=Target(">=", TARGET_RPS_RATIO, "x"),
            )
        )
    return out
