"""Event-loop lag figures: from the fleet gateway's probe samples (exact) and from the gateway's
own `llmgw_event_loop_lag_seconds` histogram (bucket bounds), when it exports one."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.stats import percentile

LAG_METRIC = "llmgw_event_loop_lag_seconds"


def in_windows(samples: Sequence[tuple[float, float]], windows: Sequence[tuple[float, float]]) -> list[float]:
    """Lags (seconds) of the wake-ups that happened inside one of the (start, end) windows."""
    return [lag for at, lag in samples if any(a <= at < b for a, b in windows)]


def summary(lags_s: Sequence[float]) -> dict[str, float]:
    ms = [x * 1000 for x in lags_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else math.nan,
        "over_1ms": sum(1 for x in ms if x > 1.0),
    }


def stalls(
    samples: Sequence[tuple[float, float]], windows: Sequence[tuple[float, float]], *, over_s: float = 0.002
) -> dict[str, float]:
    """Wake-ups later than `over_s` inside the windows: how many, the median time between two
    of them (a periodic stall, e.g. a control-loop tick, shows as its period) and the largest."""
    times = [at for at, lag in samples if lag > over_s and any(a <= at < b for a, b in windows)]
    gaps = [b - a for a, b in itertools.pairwise(times) if b - a < 30]
    return {
        "count": len(times),
        "median_gap_s": round(percentile(gaps, 50), 2) if gaps else math.nan,
        "largest_ms": round(
            max((lag for at, lag in samples if any(a <= at < b for a, b in windows)), default=0) * 1000, 1
        ),
    }


def scrape(base_url: str) -> tuple[str, float]:
    """GET /metrics: the text and how long the scrape took (seconds)."""
    with httpx.Client(timeout=120) as client:
        r = client.get(base_url + "/metrics")
        r.raise_for_status()
        return r.text, r.elapsed.total_seconds()


def buckets(exposition: str) -> dict[float, float] | None:
    """Cumulative bucket counts of the lag histogram by upper bound; None when not exported."""
    for family in text_string_to_metric_families(exposition):
        if family.name == LAG_METRIC:
            return {
                float(s.labels["le"]): s.value for s in family.samples if s.name == LAG_METRIC + "_bucket"
            }
    return None


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Like PromQL's histogram_quantile over the increase between two scrapes (seconds)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower
