"""Command line: `python -m tests.sim --seeds 2000` runs seeds 0..1999 and prints what they found;
`python -m tests.sim --seed 17` replays one seed with its whole trace."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from tests.sim.invariants import Violation
from tests.sim.plan import fault_kinds, parse_only
from tests.sim.sim import Sim, SimResult

DEFAULT_STEPS = 60


def run_seed(seed: int, steps: int, only: frozenset[str] | None = None) -> SimResult:
    return Sim(seed, steps, only=only).run()


def _summary(seed: int, steps: int, only: frozenset[str] | None) -> SimResult:
    result = run_seed(seed, steps, only)
    result.trace = []  # not sent back between processes
    return result


def run_seeds(
    seeds: list[int], steps: int, jobs: int = 1, only: frozenset[str] | None = None
) -> Iterator[SimResult]:
    if jobs <= 1:
        for seed in seeds:
            yield _summary(seed, steps, only)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(_summary, seeds, [steps] * len(seeds), [only] * len(seeds), chunksize=8)


def report(results: list[SimResult], seconds: float, *, every: bool) -> str:
    faults: Counter[str] = Counter()
    by_invariant: dict[str, list[Violation]] = defaultdict(list)
    for r in results:
        faults.update(r.faults)
        for v in r.violations:
            by_invariant[v.invariant].append(v)
    failing = sorted({v.seed for r in results for v in r.violations})
    lines = [
        f"seeds: {len(results)} ({results[0].seed}..{results[-1].seed}), steps per seed: {results[0].steps}, "
        f"virtual time: {sum(r.virtual_seconds for r in results) / 3600:.1f} h, real time: {seconds:.1f} s",
        "faults injected: " + (", ".join(f"{k} {n}" for k, n in sorted(faults.items())) or "none"),
        f"seeds with violations: {len(failing)}",
    ]
    for invariant, found in sorted(by_invariant.items(), key=lambda kv: -len({v.seed for v in kv[1]})):
        seeds = sorted({v.seed for v in found})
        shown = ", ".join(map(str, seeds[:12])) + (" ..." if len(seeds) > 12 else "")
        lines.append(f"  {invariant}: {len(seeds)} seeds ({shown})")
        for v in found if every else found[:1]:
            lines.append(f"    {v.line()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay one seed and print its trace")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per seed")
    parser.add_argument("--jobs", type=int, default=1, help="processes (the machine is shared: 1)")
    parser.add_argument("--all", action="store_true", help="print every violation, not one per invariant")
    parser.add_argument(
        "--only",
        metavar="KINDS",
        help="inject only these faults (comma-separated; 'none' for none): " + ", ".join(fault_kinds()),
    )
    args = parser.parse_args(argv)
    only = parse_only(args.only)
    if args.seed is not None:
        result = run_seed(args.seed, args.steps, only)
        print("\n".join(result.trace))
        print(report([result], result.real_seconds, every=True))
        print(f"trace hash: {result.trace_hash}")
        return 1 if result.violations else 0
    started = time.perf_counter()
    results = []
    seeds = list(range(args.start, args.start + args.seeds))
    for result in run_seeds(seeds, args.steps, args.jobs, only):
        results.append(result)
        if len(results) % 100 == 0:
            print(f"... {len(results)} seeds", file=sys.stderr, flush=True)
    print(report(results, time.perf_counter() - started, every=args.all))
    return 1 if any(r.violations for r in results) else 0
