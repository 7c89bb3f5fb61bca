"""Result rows, targets, the printed table and the JSON file.

Every row holds a figure measured against a baseline of the same run: `baseline` and `subject`
say what was compared (e.g. "direct 0.21 ms" and "gateway 0.93 ms"), `value` is the difference
or ratio that the target applies to.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    op: str  # one of _OPS
    threshold: float
    unit: str = ""

    def met(self, value: float) -> bool:
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:,g}{(' ' + self.unit) if self.unit else ''}"


@dataclass
class Row:
    bench: str
    metric: str
    value: float
    unit: str = ""
    baseline: str = ""
    subject: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = round(self.value, 4)
        out["target"] = str(self.target) if self.target else None
        out["met"] = self.met
        return out


@dataclass
class BenchResult:
    """What one benchmark returns: rows for the table, raw figures for the JSON, or why it
    was skipped."""

    name: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0


def fmt(value: float, unit: str = "") -> str:
    """A figure with about three significant digits; unit-less whole numbers (counts) as such."""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if not unit and float(value).is_integer():
        return f"{int(value):,}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 0.1 else f"{value:.3f}"


_HEADER = ("benchmark", "metric", "baseline", "subject", "result", "target", "met?")


def table(results: Sequence[BenchResult]) -> str:
    lines: list[tuple[str, ...]] = [_HEADER]
    for res in results:
        if res.skipped or res.error:
            lines.append((res.name, "skipped (see below)" if res.skipped else "ERROR (see below)", *[""] * 5))
            continue
        for row in res.rows:
            met = {None: "", True: "yes", False: "NO"}[row.met]
            result = f"{fmt(row.value, row.unit)}{(' ' + row.unit) if row.unit else ''}"
            lines.append(
                (row.bench, row.metric, row.baseline, row.subject, result, str(row.target or ""), met)
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def notes(results: Sequence[BenchResult]) -> str:
    """Skip reasons, errors and the rows' notes, one line each."""
    out = []
    for res in results:
        if res.skipped:
            out.append(f"- {res.name}: skipped: {res.skipped}")
        if res.error:
            out.append(f"- {res.name}: error: {res.error}")
        out.extend(f"- {r.bench} / {r.metric}: {r.note}" for r in res.rows if r.note)
    return "\n".join(out)


def git_commit() -> str | None:
    """The checked-out commit, with `+dirty` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    return {
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }


def write_json(
    results: Sequence[BenchResult], *, quick: bool, started: float, machine_info: dict[str, Any]
) -> Path:
    """Write bench/results/bench-<time>.json (and latest.json, a copy); return the path.
    `machine_info` is `machine()` read when the run started (the commit may move during it)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    payload = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "quick": quick,
        "machine": machine_info,
        "benchmarks": {
            res.name: {
                "seconds": round(res.seconds, 1),
                "skipped": res.skipped,
                "error": res.error,
                "rows": [row.as_json() for row in res.rows],
                "raw": res.raw,
            }
            for res in results
        },
    }
    text = json.dumps(payload, indent=2, default=str) + "\n"
    path = RESULTS_DIR / f"bench-{stamp}{'-quick' if quick else ''}.json"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    return path
