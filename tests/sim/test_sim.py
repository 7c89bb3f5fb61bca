"""The fault simulator in `make test`: 200 seeds, the determinism of a seed, and the seeds that
broke an invariant on the controller before issue 9's redesign (`-m sim_regression`)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sim.plan import parse_only
from tests.sim.run import report, run_seeds
from tests.sim.sim import Sim

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[2]
SEEDS = 200
STEPS = 5  # make sim runs longer seeds (40 steps)
# 200 seeds of 5 steps: ~26 s on 2 processes of this 2-core machine when it is quiet, ~53 s on one.
JOBS = min(2, os.cpu_count() or 1)

# Seeds that break an invariant on the controller as of 5899567 (48b3a80 moved into packages):
# (seed, steps, faults) -> (an invariant it breaks, the defect that shows; "review N" is the defect's
# number in shared/review/code-review-48b3a80.md). `faults` is `--only`: "mix" is the seed's own
# mix, "none" no fault at all. Replay one: python -m tests.sim --seed S --steps K --only F
REGRESSION_SEEDS: dict[tuple[int, int, str], tuple[str, str]] = {
    (0, 2, "none"): (
        "client-error",
        "an unload cancels a cold start: its waiter gets a bare CancelledError (review 11)",
    ),
    (33, 9, "none"): (
        "admin-error",
        "load?wait=true whose start is cancelled ends in CancelledError, no response (review 11)",
    ),
    (183, 3, "mix"): (
        "client-error",
        "a failed start whose provider.stop fails hands waiters the ProviderError (review 11)",
    ),
    (11, 34, "none"): (
        "queue-full",
        "a waiter that disconnects keeps its slot: 503 queue_full below the limit (review 12)",
    ),
    (94, 16, "none"): (
        "owner-alive",
        "the requester's launch cancelled mid-takeover: victim DRAINING forever (review 1)",
    ),
    (58, 22, "none"): (
        "owner-alive",
        "a 2nd unload cancels a launch's teardown: stop cut short, engine left (new; 17)",
    ),
    (7, 23, "engine-crash"): (
        "owner-alive",
        "a request for the victim's model mid-takeover replaces the victim (new)",
    ),
    (4, 19, "load-fail"): (
        "world-owned",
        "a failed start is FAILED before provider.stop returns (review 17)",
    ),
    (10, 7, "engine-crash"): ("world-owned", "an engine found dead is FAILED before its stop returns (new)"),
    (0, 8, "stop-fail"): (
        "world-owned",
        "a failed stop: FAILED and forgotten, engine runs on, no retry (review 17)",
    ),
    (17, 17, "swap-fail-before"): (
        "world-owned",
        "a failed swap marks the victim FAILED, never stops it (review 5)",
    ),
    (38, 13, "swap-fail-after"): (
        "world-owned",
        "a swap that stopped the old engine then failed orphans the cluster (review 5)",
    ),
    (17, 17, "swap-capacity"): (
        "world-owned",
        "swap raising CapacityError loses the healthy victim (review 5)",
    ),
    (0, 20, "heartbeat-hang"): (
        "idle-billing",
        "one hung heartbeat stalls the reaper tick: no idle stops (review 9)",
    ),
    (6, 17, "heartbeat-hang"): (
        "after-hours",
        "one hung heartbeat stalls the reaper tick: no after-hours stop (review 9)",
    ),
    (14, 20, "preempt"): (
        "ledger-sum",
        "a preempted cluster (ClusterDoesNotExist) stays READY and billed (review 22)",
    ),
    (0, 8, "stop-hang"): (
        "ledger-sum",
        "a hung stop: failsafe deletes the cluster, the ledger bills on; shutdown hangs (25, 9)",
    ),
    (11, 35, "stop-hang"): (
        "request-wait",
        "a hung stop: the model's next start waits outside the timeout (review 25)",
    ),
    (227, 15, "mix"): (
        "world-owned",
        "reconcile while list() fails closes deployments, engines left running (review 14)",
    ),
    (17, 35, "list-fail,kill"): (
        "world-owned",
        "reconcile while list() fails closes a READY deployment unstopped (review 14)",
    ),
    (39, 25, "stop-fail,kill"): (
        "lifespan",
        "adopt of an unknown cluster whose row is FAILED: IntegrityError at startup (review 15)",
    ),
    (154, 8, "mix"): (
        "lifespan",
        "the shutdown sweep's list() fails: lifespan aborts, lease not released (review 13)",
    ),
    (0, 8, "db-burst"): (
        "fencing",
        "one DB error ends lease renewal; the old holder keeps stopping engines (review 8, 2)",
    ),
    (0, 5, "db-burst"): (
        "lifespan",
        "the dead renewal task's error re-raised at shutdown: no lease release (review 8)",
    ),
    (4, 8, "stall"): (
        "stale-route",
        "a stalled holder wakes, loses its lease, stops what the new holder adopted (review 2)",
    ),
    (42, 35, "stall"): (
        "fencing",
        "a holder waking from a stall past its lease heartbeats before renewing (new; 2)",
    ),
    (7, 34, "stall"): (
        "ledger-overlap",
        "two controllers write one deployment's ledger: overlapping intervals (new; 2, 8)",
    ),
    (13, 19, "stall"): (
        "client-error",
        "the old holder's CAS fails after a takeover: waiters get ProviderError (new)",
    ),
    (5, 18, "db-burst"): (
        "lifespan",
        "the new holder's adopt races the old holder's CAS: startup crashes (new; 8)",
    ),
    (2, 25, "kill"): (
        "schedule-replay",
        "a standby that takes over fires the schedules it missed (review 7)",
    ),
    (47, 23, "db-burst"): (
        "owner-alive",
        "a DB error in a transition leaves the deployment STOPPING, forgotten (new)",
    ),
    (47, 35, "db-burst"): (
        "admin-error",
        "a DB error in an admin call is a plain-text 500, no envelope (new; item 5)",
    ),
    # Seeds of the 300-seed, 40-step run on 880fc9b (the runner design), cut after the step that
    # broke the invariant; "(sim)": the simulator was wrong, not the controller.
    (56, 13, "mix"): (
        "ledger-sum",
        "a no-capacity launch under a DB outage: reconcile bills its cold time until now, no cluster",
    ),
    (64, 32, "mix"): (
        "owner-alive",
        "a holder waking from a stall moves its row to ready after the new holder reconciled it",
    ),
    (187, 32, "mix"): (
        "lifespan",
        "a holder waking from a stall moves its row to stopping: the new holder's adopt raises",
    ),
    (73, 23, "mix"): (
        "lifespan",
        "a locked database in reconcile's close_stale aborts the startup; the lease is never released",
    ),
    (207, 38, "mix"): (
        "lifespan",
        "a database error in reconcile's live_deployments aborts the startup, lease kept renewed",
    ),
    (81, 33, "mix"): (
        "ledger-sum",
        "a launch that failed while its gateway was killed: billed until the reconcile, not 2 s",
    ),
    (128, 34, "mix"): (
        "ledger-sum",
        "a takeover whose victim cannot record the handover: both own the cluster, no discard",
    ),
    (99, 8, "mix"): (
        "ledger-sum",
        "(sim) a cluster that went during the holder's DB outage: its end is a guess, like a kill's",
    ),
    (160, 12, "mix"): (
        "idle-billing",
        "(sim) an engine that exited while loading counted idle from its cluster's creation",
    ),
    (18, 40, "mix"): (
        "idle-billing",
        "(sim) the quiesce thawed a stalled holder but counted its idle time from before the stall",
    ),
    # Seeds of the 300-seed, 40-step run on 32f3ab2 (replayed there: the orphan sweep's lists
    # draw from the world's generator, so on the sweep they no longer run the same faults).
    (104, 24, "mix"): (
        "world-owned",
        "a gateway dies mid-launch, the next one's list() fails: its clusters run on unowned (orphans)",
    ),
    (162, 14, "mix"): (
        "ledger-sum",
        "an orphan while list() fails is billed until the reconcile; a no-capacity launch bills phantom time",
    ),
    (265, 34, "mix"): (
        "idle-billing",
        "a lapsed holder records the cluster of a launch the new holder closed: an idle orphan, billed 40s of 180s",
    ),
    (103, 31, "mix"): (
        "idle-billing",
        "(sim) a claim's swap hung until the cold-start timeout: counted as the old model's idle engine",
    ),
    # The 300-seed, 40-step run on the merged code of the second session (writes through the writer).
    (57, 18, "mix"): (
        "ledger-overlap",
        "a holder thawed from a stall sends its queued ledger writes over the new holder's ledger",
    ),
    # Seeds of the 1,000-seed, 40-step run on the orphan sweep (f414317 merged with main).
    (347, 23, "mix"): (
        "ledger-sum",
        "a preempted cluster found by a heartbeat a stall delayed: billed until it was sent, not due",
    ),
    (528, 32, "mix"): (
        "ledger-sum",
        "a start cut short while it waited for a takeover's victim bills its wait, holding nothing",
    ),
    (530, 27, "mix"): (
        "ledger-sum",
        "a holder waking from a stall renews the lease a dead standby took: its stale view, rows orphaned",
    ),
    (787, 16, "mix"): (
        "ledger-sum",
        "a stop recorded late (database errors retried): the ledger bills the engine until the record",
    ),
    # Seeds of the same run.
    (468, 40, "mix"): (
        "idle-billing",
        "a model pinned by an admin override, unlisted by a reload: its engine was never idle-stopped",
    ),
    (545, 18, "mix"): (
        "idle-billing",
        "an unlisted pinned model's engine was never idle-stopped; (sim) its idle clock ran from before the reload",
    ),
    (605, 37, "mix"): (
        "idle-billing",
        "a reload unlists a model an override pinned: its idle engine, unreachable (404), billed on",
    ),
    (646, 36, "mix"): (
        "idle-billing",
        "a reload unlists a pinned model: its engine kept the pin, never idle-stopped, billed until shutdown",
    ),
    # Seeds of the 40-step run on e7ee8b6.
    (664, 24, "mix"): (
        "ledger-sum",
        "heartbeats unanswered (API down) while probes found the engine up: billed 121 s short of the failsafe",
    ),
    # Seeds of the 40-step run on 24ec31c (every gateway serves).
    (1642, 19, "mix"): (
        "after-hours",
        "sim: an orphan (its row closed by a reconcile while the list failed) is the orphan sweep's, "
        "within the world-owned bound, not after-hours'",
    ),
}


def test_every_seed_holds_every_invariant() -> None:
    started = time.perf_counter()
    results = list(run_seeds(list(range(SEEDS)), STEPS, jobs=JOBS))
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


def test_a_killed_gateway_leaves_no_suspended_coroutine() -> None:
    """Seed 0 kills gw0 at step 16 with three deployments ready. Its coroutines (runners,
    reaper, lease, the lifespan) are closed when the seed ends; left suspended, Python closed
    them whenever they were collected: in a later seed's loop, or at exit with no loop
    ("Event loop is closed", "no running event loop" tracebacks after a sweep)."""
    sim = Sim(0, 17)
    result = sim.run()
    assert result.faults["kill-9"] == 1 and not result.violations
    tasks = asyncio.all_tasks(sim.loop)
    assert any(t.get_coro().__qualname__ == "DeploymentRunner.run" for t in tasks)  # gw0's, never finished
    suspended = [t for t in tasks if inspect.getcoroutinestate(t.get_coro()) != inspect.CORO_CLOSED]
    assert not suspended


@pytest.mark.sim_regression
@pytest.mark.parametrize(
    ("seed", "steps", "faults"),
    sorted(REGRESSION_SEEDS),
    ids=[
        f"{seed}-{steps}-{faults}-{REGRESSION_SEEDS[(seed, steps, faults)][0]}"
        for seed, steps, faults in sorted(REGRESSION_SEEDS)
    ],
)
def test_seed_that_failed_before_the_redesign(seed: int, steps: int, faults: str) -> None:
    invariant, defect = REGRESSION_SEEDS[(seed, steps, faults)]
    result = Sim(seed, steps, only=parse_only(faults)).run()
    assert not result.violations, f"{invariant}: {defect}\n" + report(
        [result], result.real_seconds, every=True
    )
