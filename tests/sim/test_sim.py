"""The fault simulator in `make test`: 200 seeds, the determinism of a seed, and the seeds that
broke an invariant on the controller before issue 9's redesign (`-m sim_regression`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sim.run import report
from tests.sim.sim import Sim

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[2]
SEEDS = 200
STEPS = 5  # ~0.15 s a seed here: 200 seeds in about 30 s (make sim runs longer seeds)

# (seed, steps) -> the invariant the seed broke on the old controller, and the defect it shows.
# The plan of a seed is drawn step by step, so (seed, k) replays the first k steps of (seed, n).
REGRESSION_SEEDS: dict[tuple[int, int], tuple[str, str]] = {}


def test_every_seed_holds_every_invariant() -> None:
    started = time.perf_counter()
    results = [Sim(seed, STEPS).run() for seed in range(SEEDS)]
    assert [r.seed for r in results] == list(range(SEEDS))  # none skipped
    assert all(r.steps == STEPS for r in results)
    assert sum(sum(r.faults.values()) for r in results) > 0  # the run injected faults
    failing = [r for r in results if r.violations]
    assert not failing, report(results, time.perf_counter() - started, every=True)


def test_a_seed_replays_the_same_trace() -> None:
    first, again = Sim(3, 25).run(), Sim(3, 25).run()
    assert sum(first.faults.values()) > 0 and len(first.trace) > 100
    assert first.trace == again.trace and first.trace_hash == again.trace_hash
    assert Sim(4, 25).run().trace_hash != first.trace_hash


def test_a_seed_replays_in_another_process() -> None:
    """Another process hashes strings differently (PYTHONHASHSEED): the trace must not care."""
    expected = Sim(3, 25).run().trace_hash
    env = {**os.environ, "PYTHONHASHSEED": "4242", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.sim", "--seed", "3", "--steps", "25"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"trace hash: {expected}" in out.stdout, out.stderr[-2000:]


@pytest.mark.sim_regression
@pytest.mark.parametrize(
    ("seed", "steps", "invariant"),
    [(seed, steps, invariant) for (seed, steps), (invariant, _) in sorted(REGRESSION_SEEDS.items())],
)
def test_seed_that_failed_before_the_redesign(seed: int, steps: int, invariant: str) -> None:
    result = Sim(seed, steps).run()
    assert not result.violations, report([result], result.real_seconds, every=True)
