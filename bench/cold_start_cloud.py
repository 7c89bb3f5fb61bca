"""A phase model of a cloud cold start (SkyPilot), since no cloud is reachable from here.

Each phase has a low and a high figure in seconds and the published source it comes from; a
configuration is the phases it goes through. 8B is Llama-3.1-8B (16 GB bf16) on one L4
(g6.xlarge), 70B is Llama-3.1-70B (140 GB bf16) on 4 GPUs (TP 4). Figures measured on the 8B
are scaled to the 70B by bytes (weights) or by layer count, 80 against 32 (compile, graphs,
init): those are extrapolations and say so. `--db` reads the same phases, as far as the gateway
records them (launch: provisioning and runtime; load: setup, weights, load, compile, graphs),
from a gateway database.

    python -m bench.cold_start_cloud [--db sqlite:///data/gateway.db]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

GB = 1e9
SIZE = {"8B": 16 * GB, "70B": 140 * GB}
LAYERS = {"8B": 32, "70B": 80}

AUDIT = "skypilot-audit-48b3a80.md s.2 (estimate)"
TENSORFUSE = "tensorfuse.io/docs/blogs/reducing_gpu_cold_start (Llama-3.1-8B, L40S)"
PEERS = "research/peer-anchors.md (SkyPilot VM provisioning)"


@dataclass(frozen=True)
class Phase:
    name: str
    low: float  # seconds, for the 8B
    high: float
    source: str
    scale: str = "fixed"  # fixed | bytes | layers

    def seconds(self, model: str) -> tuple[float, float]:
        factor = {"fixed": 1.0, "bytes": SIZE[model] / SIZE["8B"], "layers": LAYERS[model] / LAYERS["8B"]}
        return self.low * factor[self.scale], self.high * factor[self.scale]


def _rate(name: str, low_bytes_s: float, high_bytes_s: float, source: str) -> Phase:
    """A transfer of the model's weights: 16 GB at the given rates (scaled by bytes for 70B)."""
    return Phase(name, SIZE["8B"] / high_bytes_s, SIZE["8B"] / low_bytes_s, source, scale="bytes")


PHASES = {
    "optimizer": Phase("optimizer and request", 6, 120, AUDIT + ", +10-60 s per failed region"),
    "provision": Phase("VM up, SSH, SkyPilot runtime", 60, 240, PEERS + " 60-125 s; " + AUDIT + " 2-4 min"),
    "pip": Phase("setup: pip install vllm", 180, 360, AUDIT),
    "uv": Phase("setup: uv pip install vllm", 60, 120, AUDIT),
    "pull": Phase("image pull and extract (several GB)", 120, 240, AUDIT),
    "exec": Phase(
        "exec on a live cluster, old engine released", 5, 30, "SkyPilot exec + release wait (estimate)"
    ),
    "download": _rate(
        "weights: Hugging Face download to disk",
        218e6,
        262e6,
        "gp3 medium cap 218 MB/s (audit, clouds/aws.py); 16 GB in 61 s (" + TENSORFUSE + ")",
    ),
    "load": Phase(
        "weights: disk to GPU (default loader)",
        33,
        48,
        TENSORFUSE + " 33 s; NVIDIA Run:ai blog GP3 47.99 s",
        "bytes",
    ),
    "stream": _rate(
        "weights: Run:ai streamer, bucket to GPU",
        1.25e9,
        7e9,
        "NIC-bound: g6.xlarge up to 10 Gb/s; Anyscale S3 streaming 140 GB in 20 s (anchors.md s.2)",
    ),
    "compile_cold": Phase(
        "torch.compile, cache lost", 52, 52, TENSORFUSE + " dynamo 10 + compile 42", "layers"
    ),
    "compile_warm": Phase("torch.compile, cache mounted", 13, 13, TENSORFUSE + " warm", "layers"),
    "graphs_cold": Phase("CUDA graph capture", 54, 54, TENSORFUSE, "layers"),
    "graphs_warm": Phase("CUDA graph capture, cache warm", 7, 7, TENSORFUSE + " warm", "layers"),
    "init_cold": Phase("engine init (profile, KV cache, warm-up)", 94, 94, TENSORFUSE, "layers"),
    "init_warm": Phase("engine init, caches warm", 34, 34, TENSORFUSE + " warm", "layers"),
}
_COLD = ["download", "load", "compile_cold", "graphs_cold", "init_cold"]
_STORE = ["stream", "compile_warm", "graphs_warm", "init_warm"]
CONFIGS = {
    "pip (default)": ["optimizer", "provision", "pip", *_COLD],
    "uv": ["optimizer", "provision", "uv", *_COLD],
    "image": ["optimizer", "provision", "pull", *_COLD],
    "image + weight store + cache": ["optimizer", "provision", "pull", *_STORE],
    "spare cluster + store + cache": ["exec", *_STORE],
}


def total(config: str, model: str) -> tuple[float, float]:
    spans = [PHASES[p].seconds(model) for p in CONFIGS[config]]
    return sum(s[0] for s in spans), sum(s[1] for s in spans)


def table() -> str:
    rows = ["| configuration | 8B (min) | 70B (min) |", "|---|---|---|"]
    for config in CONFIGS:
        cells = [f"{lo / 60:.1f}-{hi / 60:.1f}" for lo, hi in (total(config, m) for m in SIZE)]
        rows.append(f"| {config} | {' | '.join(cells)} |")
    return "\n".join(rows)


def phases_table() -> str:
    rows = ["| phase | 8B (s) | 70B (s) | source |", "|---|---|---|---|"]
    for phase in PHASES.values():
        spans = [phase.seconds(m) for m in SIZE]
        cells = [f"{lo:.0f}-{hi:.0f}" if round(lo) != round(hi) else f"{lo:.0f}" for lo, hi in spans]
        note = "" if phase.scale == "fixed" else f" (70B scaled by {phase.scale})"
        rows.append(f"| {phase.name} | {cells[0]} | {cells[1]} | {phase.source}{note} |")
    return "\n".join(rows)


def measured(db_url: str) -> str:
    """The phases the gateway records, per model: launch (launching→loading) and load
    (loading→ready), from the deployments that became ready."""
    from state import Store

    store = Store(db_url)
    spans: dict[str, list[tuple[float, float]]] = {}
    for dep in store.deployments(limit=10_000):
        if dep.launching_at and dep.loading_at and dep.ready_at:
            launch = (dep.loading_at - dep.launching_at).total_seconds()
            load = (dep.ready_at - dep.loading_at).total_seconds()
            spans.setdefault(f"{dep.provider}:{dep.model}", []).append((launch, load))
    store.close()
    rows = ["| provider:model | starts | launch median (s) | load median (s) |", "|---|---|---|---|"]
    median: Callable[[list[float]], float] = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for key, values in sorted(spans.items()):
        launches, loads = [v[0] for v in values], [v[1] for v in values]
        rows.append(f"| {key} | {len(values)} | {median(launches):.1f} | {median(loads):.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a gateway database URL: print its measured phases too")
    args = parser.parse_args()
    print("Modelled cold start, by configuration (low-high):\n")
    print(table())
    print("\nPhases:\n")
    print(phases_table())
    if args.db:
        print("\nMeasured (this gateway's starts):\n")
        print(measured(args.db))


if __name__ == "__main__":
    main()
