"""The table rows of `proxy_overhead`, with the targets of issue 11 (ratios of the same run)."""

from __future__ import annotations

import math
from typing import Any

from bench.report import Row, Target

NAME = "proxy_overhead"
C = 32
NAN = math.nan


def rows(raw: dict[str, Any]) -> list[Row]:
    return c1_rows(raw) + c32_rows(raw) + stream_rows(raw) + lag_rows(raw)


def _added(
    raw: dict[str, Any], run: str, subject: str, key: str, ttfc: bool = False
) -> tuple[float, str, str]:
    """(subject - direct, baseline text, subject text) of one percentile key in an interleaved run."""
    if run not in raw:
        return NAN, "", f"{subject}: not measured"
    d, s = raw[run]["direct"], raw[run][subject]
    if ttfc:
        d, s = d["ttfc"], s["ttfc"]
    return s[key] - d[key], f"direct {d[key]:.2f} ms", f"{subject} {s[key]:.2f} ms"


def c1_rows(raw: dict[str, Any]) -> list[Row]:
    out = []
    n = raw["c1_buffered"]["gateway"]["n"]
    for q, target in ((50, 0.4), (99, 1.0)):
        value, base, subj = _added(raw, "c1_buffered", "gateway", f"p{q}_ms")
        lite, _, lite_subj = _added(raw, "c1_buffered_litellm", "litellm", f"p{q}_ms")
        out.append(
            Row(
                NAME,
                f"c=1 added latency p{q}",
                value,
                "ms",
                baseline=base,
                subject=subj,
                target=Target("<=", target, "ms"),
                note=f"{n:,} requests interleaved over {raw['window_s']:g} s; LiteLLM added "
                + (f"{lite:.2f} ms ({lite_subj})" if not math.isnan(lite) else "n/a (not installed)"),
            )
        )
    return out


def _c32(raw: dict[str, Any], kind: str, name: str, key: str) -> float:
    run = raw[f"c{C}_{kind}"]
    return float(run[name][key]) if name in run else NAN


def c32_rows(raw: dict[str, Any]) -> list[Row]:
    gw, direct, lite = (_c32(raw, "buffered", n, "rps") for n in ("gateway", "direct", "litellm"))
    p50, p99 = _c32(raw, "buffered", "gateway", "p50_ms"), _c32(raw, "buffered", "gateway", "p99_ms")
    run = raw[f"c{C}_buffered"]["gateway"]
    note = f"{run['generator']}, {raw['window_s']:g} s each; gateway errors {run['errors']}"
    return [
        Row(
            NAME,
            f"c={C} gateway RPS",
            gw,
            "rps",
            baseline=f"direct {direct:,.0f} rps",
            subject=f"gateway {gw:,.0f} rps",
            target=Target(">=", 3500, "rps"),
            note=note,
        ),
        Row(
            NAME,
            f"c={C} gateway RPS / LiteLLM RPS",
            gw / lite,
            "x",
            baseline=_lite_text(lite, "rps"),
            subject=f"gateway {gw:,.0f} rps",
            target=Target(">=", 30, "x"),
            note=_lite_note(raw),
        ),
        Row(
            NAME,
            f"c={C} gateway p99 / p50",
            p99 / p50,
            "x",
            baseline=f"p50 {p50:.2f} ms",
            subject=f"p99 {p99:.2f} ms",
            target=Target("<=", 3, "x"),
            note=f"direct p50 {_c32(raw, 'buffered', 'direct', 'p50_ms'):.2f} ms, "
            f"p99 {_c32(raw, 'buffered', 'direct', 'p99_ms'):.2f} ms",
        ),
    ]


def _lite_text(value: float, unit: str) -> str:
    return "litellm NOT INSTALLED" if math.isnan(value) else f"litellm {value:,.1f} {unit}"


def _lite_note(raw: dict[str, Any]) -> str:
    if "litellm_skipped" in raw:
        return "NOT MEASURED: " + str(raw["litellm_skipped"])
    return f"LiteLLM {raw.get('litellm_version', '?')}, one worker, same stub, same run"


def stream_rows(raw: dict[str, Any]) -> list[Row]:
    value, base, subj = _added(raw, "c1_stream", "gateway", "p50_ms", ttfc=True)
    p99, _, _ = _added(raw, "c1_stream", "gateway", "p99_ms", ttfc=True)
    lite, _, _ = _added(raw, "c1_stream_litellm", "litellm", "p50_ms", ttfc=True)
    gw, direct, lt = (_c32(raw, "stream", n, "rps") for n in ("gateway", "direct", "litellm"))
    return [
        Row(
            NAME,
            "streaming c=1 added time to first event p50",
            value,
            "ms",
            baseline=base,
            subject=subj,
            target=Target("<=", 0.5, "ms"),
            note=f"{raw['c1_stream']['gateway']['n']:,} streams of {raw['c1_stream']['gateway']['events_per_stream']} "
            f"events; added p99 {p99:.2f} ms; LiteLLM added p50 "
            + ("n/a" if math.isnan(lite) else f"{lite:.2f} ms"),
        ),
        Row(
            NAME,
            f"streaming c={C} streams/s gateway / LiteLLM",
            gw / lt,
            "x",
            baseline=_lite_text(lt, "streams/s"),
            subject=f"gateway {gw:,.0f} streams/s",
            target=Target(">=", 40, "x"),
            note=f"direct {direct:,.0f} streams/s; " + _lite_note(raw),
        ),
    ]


def lag_rows(raw: dict[str, Any]) -> list[Row]:
    lags, stalls = raw["loop_lag"], raw["loop_lag_stalls"]
    hist = raw.get("loop_lag_histogram_p99_ms")
    out = []
    for name, label in (("c1", "c=1"), (f"c{C}", f"c={C}")):
        probe = lags[name]
        out.append(
            Row(
                NAME,
                f"event-loop lag p99, {label} windows",
                probe["p99_ms"],
                "ms",
                baseline=f"no traffic p99 {lags['idle']['p99_ms']:.2f} ms",
                subject=f"max {probe['max_ms']:.1f} ms",
                target=Target("<=", 1.0, "ms"),
                note=f"{probe['n']} wake-ups (every 100 ms) while the gateway was measured, "
                f"{probe['over_1ms']} over 1 ms",
            ),
        )
    out[0].note += (
        f"; stalls over 2 ms without traffic and at c=1: {stalls['count']}, "
        f"median {stalls['median_gap_s']} s apart, largest {stalls['largest_ms']} ms"
    )
    out[1].note += "; " + (
        f"llmgw_event_loop_lag_seconds p99 over the run {hist:.2f} ms"
        if hist is not None
        else "llmgw_event_loop_lag_seconds not exported by this gateway"
    )
    out.append(
        Row(
            NAME,
            "/metrics scrape",
            raw["metrics_scrape_s_last"] * 1000,
            "ms",
            baseline=f"first scrape {raw['metrics_scrape_s_first'] * 1000:,.0f} ms",
            subject=f"{raw['metrics_bytes'] / 1e6:.1f} MB",
            note=f"{raw['models']:,} models in the reference, {raw['live_deployments']:,} live deployments; "
            f"the loop was held up to {raw['loop_lag']['scrape']['max_ms']:.1f} ms during the last scrape",
        ),
    )
    return out
