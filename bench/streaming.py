"""Benchmark 2: streamed chat completions, directly from the stub vs through the gateway, one at a
time, interleaved round by round.

The stub sends the first SSE event, pauses `FIRST_GAP` seconds (an engine's first token comes
alone too), then the other `CHUNKS - 1` events as fast as its event loop turns, one write each.
Time to first chunk is when the first complete event arrived: alone in flight, so no relay can
batch it with later ones. Throughput is events per second over the whole stream, the stub's
pause taken out: the most the path delivers to one client, far above what an engine produces
per stream.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import uvloop

from bench import load
from bench.gateway_proc import start_gateway
from bench.http_client import Reply, post_request
from bench.procs import stub_server
from bench.report import BenchResult, Row, Target
from bench.stats import median, percentile
from bench.suite import Context

NAME = "streaming"
MODEL = "stub"
CHUNKS = 200
FIRST_GAP = 0.010
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count to two hundred."}],
    "max_tokens": CHUNKS,
    "stream": True,
}


def chunk_rate(reply: Reply) -> float:
    """Events per second from the request to the last event, less the stub's pause. (Not from
    the first event on: a relay that reads several events at once delivers them in one burst,
    which would look faster than the upstream itself.)"""
    span = reply.ended - reply.started - FIRST_GAP
    return reply.events / span if span > 0 else float("nan")


def run(ctx: Context) -> BenchResult:
    rounds = ctx.pick(400, 50)
    with ExitStack() as stack:
        stub = stub_server(ctx.workdir, chunks=CHUNKS, first_gap=FIRST_GAP)
        stack.callback(stub.stop)
        gateway = start_gateway(ctx.workdir / "gateway", {MODEL: {"endpoint": stub.base_url}})
        stack.callback(gateway.stop)
        requests = {
            "direct": (stub.base_url, post_request(stub.base_url, "/v1/chat/completions", BODY)),
            "gateway": (gateway.base_url, post_request(gateway.base_url, "/v1/chat/completions", BODY)),
        }
        series = uvloop.run(
            load.interleaved(requests, rounds=rounds, time_limit=ctx.pick(90.0, 15.0), stream=True)
        )
    raw: dict[str, Any] = {"chunks_per_stream": CHUNKS}
    for name, s in series.items():
        ttfc = [r.time_to_first_event * 1000 for r in s.replies]
        raw[name] = {
            "streams": len(s.replies),
            "errors": s.errors,
            "events_per_stream": median([r.events for r in s.replies]),
            "ttfc_p50_ms": round(percentile(ttfc, 50), 3),
            "ttfc_p99_ms": round(percentile(ttfc, 99), 3),
            "chunks_per_s_p50": round(median([chunk_rate(r) for r in s.replies])),
            "stream_p50_ms": round(percentile([r.latency * 1000 for r in s.replies], 50), 3),
        }
    d, g = raw["direct"], raw["gateway"]
    rows = [
        Row(
            NAME,
            "time to first chunk, added p50",
            g["ttfc_p50_ms"] - d["ttfc_p50_ms"],
            "ms",
            baseline=f"direct {d['ttfc_p50_ms']:.2f} ms",
            subject=f"gateway {g['ttfc_p50_ms']:.2f} ms",
            target=Target("<=", 1.0, "ms"),
            note=f"{g['streams']} interleaved streams of {CHUNKS} events; errors direct {d['errors']}, "
            f"gateway {g['errors']}; added p99 {g['ttfc_p99_ms'] - d['ttfc_p99_ms']:.2f} ms",
        ),
        Row(
            NAME,
            "chunk throughput, gateway / direct",
            g["chunks_per_s_p50"] / d["chunks_per_s_p50"],
            "x",
            baseline=f"direct {d['chunks_per_s_p50']:,} chunks/s",
            subject=f"gateway {g['chunks_per_s_p50']:,} chunks/s",
            note=f"whole {CHUNKS}-event stream p50 (with the stub's {FIRST_GAP * 1000:.0f} ms pause): "
            f"direct {d['stream_p50_ms']:.1f} ms, gateway {g['stream_p50_ms']:.1f} ms",
        ),
    ]
    return BenchResult(NAME, rows=rows, raw=raw)
