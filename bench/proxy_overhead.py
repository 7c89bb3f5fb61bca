"""Benchmark 1: what users feel through the gateway, against the stub upstream called directly and
against LiteLLM, all in one run, with 10,000 models in the reference and 1,000 live deployments.

The gateway is the real application with FakeProvider engines that all answer from the stub
(`bench/fleet_gateway.py`): its reaper ticks every 2 s over 1,000 deployments, usage and
last-used times are flushed, the ledger runs. Every window lasts at least 10 s so that ticks fall
inside it (a 300-request sample is over before the first one).

- c=1, buffered and streamed (20 SSE events): one request at a time, the subject and the direct
  baseline interleaved request by request; added p50 / p99 (streams: time to first event).
- c=32, buffered and streamed: closed loops (wrk, or the Python client without it), the subjects
  one after another; requests or streams per second, p50, p99.
- Event-loop lag: the gateway process's wake-up probe during the gateway's windows (exact), and
  its `llmgw_event_loop_lag_seconds` histogram over the run when it exports one.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import uvloop

from bench import lag, litellm_proc, load, wrk
from bench.fleet import loop_lag_samples, reference, start_fleet_gateway
from bench.gateway_proc import Gateway
from bench.http_client import post_request
from bench.procs import stub_server
from bench.proxy_rows import rows
from bench.report import BenchResult
from bench.stats import summary_ms
from bench.suite import Context, log

NAME = "proxy_overhead"
MODEL = "stub"
PATH = "/v1/chat/completions"
CONCURRENCY = 32
STREAM_EVENTS = 20
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
}
STREAM_BODY: dict[str, Any] = {**BODY, "max_tokens": STREAM_EVENTS, "stream": True}
SETTLE_SECONDS = 0.5  # after a /metrics scrape, before a window opens (its stall stays outside)


@dataclass
class Subject:
    """A server the load goes to: the stub itself, the gateway or LiteLLM."""

    name: str
    url: str

    def request(self, stream: bool) -> bytes:
        return post_request(self.url, PATH, STREAM_BODY if stream else BODY)


def run(ctx: Context) -> BenchResult:
    window = ctx.pick(12.0, 3.0)
    models, live = ctx.pick(10_000, 1_000), ctx.pick(1_000, 100)
    with ExitStack() as stack:
        stub = stub_server(ctx.workdir, chunks=STREAM_EVENTS)
        stack.callback(stub.stop)
        names = list(reference(models, MODEL))
        gateway = start_fleet_gateway(
            ctx.workdir / "gateway", stub.base_url, models=reference(models, MODEL), live=names[:live]
        )
        stack.callback(gateway.stop)
        litellm, info = start_litellm(ctx, stack, stub.base_url)
        subjects = [Subject("direct", stub.base_url), Subject("gateway", gateway.base_url)]
        raw = measure(ctx, subjects, litellm, gateway, window)
    raw.update(info, models=models, live_deployments=live, window_s=window)
    return BenchResult(NAME, rows=rows(raw), raw=raw)


def start_litellm(ctx: Context, stack: ExitStack, upstream: str) -> tuple[Subject | None, dict[str, Any]]:
    """LiteLLM in front of the same stub when `.venv-litellm` exists; else None, said loudly."""
    if not litellm_proc.installed():
        why = f"LiteLLM is NOT installed ({litellm_proc.LITELLM_BIN} missing): run `make litellm`"
        banner = "!" * 78
        print(
            f"\n{banner}\n!! {why}\n!! every ratio to LiteLLM below is unmeasured (n/a)\n{banner}\n",
            file=sys.stderr,
        )
        return None, {"litellm_skipped": why}
    t0 = time.monotonic()
    server = litellm_proc.start_litellm(ctx.workdir / "litellm", MODEL, upstream)
    stack.callback(server.stop)
    info = {"litellm_version": litellm_proc.version(), "litellm_start_s": round(time.monotonic() - t0, 1)}
    return Subject("litellm", server.base_url), info


def measure(
    ctx: Context, subjects: list[Subject], litellm: Subject | None, gateway: Gateway, window: float
) -> dict[str, Any]:
    direct, proxied = subjects
    windows: dict[str, list[tuple[float, float]]] = {"idle": [], "c1": [], f"c{CONCURRENCY}": []}
    text, first_scrape = lag.scrape(gateway.base_url)
    before = lag.buckets(text)
    time.sleep(SETTLE_SECONDS)
    t0 = time.monotonic()
    time.sleep(ctx.pick(6.0, 3.0))  # no traffic: ticks only
    windows["idle"].append((t0, time.monotonic()))
    out: dict[str, Any] = {"metrics_scrape_s_first": round(first_scrape, 3), "metrics_bytes": len(text)}
    for stream in (False, True):
        kind = "stream" if stream else "buffered"
        out[f"c1_{kind}"] = sequential(direct, proxied, stream=stream, seconds=window, windows=windows["c1"])
        if litellm is not None:
            out[f"c1_{kind}_litellm"] = sequential(direct, litellm, stream=stream, seconds=window)
    for stream in (False, True):
        kind = "stream" if stream else "buffered"
        targets = [direct, proxied] + ([litellm] if litellm else [])
        out[f"c{CONCURRENCY}_{kind}"] = {
            t.name: concurrent(
                ctx,
                t,
                stream=stream,
                seconds=window,
                windows=windows[f"c{CONCURRENCY}"] if t is proxied else None,
            )
            for t in targets
        }
    t0 = time.monotonic()
    text, last_scrape = lag.scrape(gateway.base_url)
    windows["scrape"] = [(t0, time.monotonic() + 0.2)]  # the wake-up after a stall comes after it
    time.sleep(SETTLE_SECONDS)
    out["metrics_scrape_s_last"] = round(last_scrape, 3)
    samples = loop_lag_samples(gateway)
    out["loop_lag"] = {name: lag.summary(lag.in_windows(samples, w)) for name, w in windows.items()}
    out["loop_lag_stalls"] = lag.stalls(samples, windows["idle"] + windows["c1"])  # the loop is not saturated
    after = lag.buckets(text)
    if before is not None and after is not None:
        out["loop_lag_histogram_p99_ms"] = round(lag.quantile(before, after, 0.99) * 1000, 3)
    return out


def sequential(
    direct: Subject,
    subject: Subject,
    *,
    stream: bool,
    seconds: float,
    windows: list[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """One at a time for `seconds`, `direct` and `subject` interleaved request by request."""
    requests = {t.name: (t.url, t.request(stream)) for t in (direct, subject)}
    t0 = time.monotonic()
    series = uvloop.run(load.interleaved(requests, rounds=10**9, time_limit=seconds, stream=stream))
    if windows is not None:
        windows.append((t0, time.monotonic()))
    out: dict[str, Any] = {}
    for name, s in series.items():
        out[name] = {**summary_ms(s.latencies()), "errors": s.errors}
        if stream:
            ttfc = [r.time_to_first_event for r in s.replies]
            out[name]["ttfc"] = summary_ms(ttfc)
            out[name]["events_per_stream"] = min((r.events for r in s.replies), default=0)
    return out


def concurrent(
    ctx: Context, target: Subject, *, stream: bool, seconds: float, windows: list[tuple[float, float]] | None
) -> dict[str, Any]:
    """A closed loop of CONCURRENCY connections for `seconds` (wrk if installed)."""
    t0 = time.monotonic()
    if wrk.available():
        res = wrk.run_wrk(
            target.url,
            PATH,
            STREAM_BODY if stream else BODY,
            connections=CONCURRENCY,
            seconds=seconds,
            workdir=ctx.workdir,
        )
        out: dict[str, Any] = {"generator": "wrk", **res.as_json()}
    else:
        log.warning("wrk is not installed (apt-get install wrk): the Python load generator is used at c=32")
        r = uvloop.run(
            load.closed_loop(target.url, target.request(stream), connections=CONCURRENCY, seconds=seconds)
        )
        out = {"generator": "python", "rps": round(r.rps, 1), "errors": r.errors, **summary_ms(r.latencies)}
    if windows is not None:
        windows.append((t0, time.monotonic()))
    return out
