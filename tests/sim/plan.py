"""What one seed simulates: the gateway's settings and models, the cloud's faults, and the list
of steps (traffic, admin calls, faults, time passing), all drawn from the seed up front.

The plan is drawn before the run, from its own random generator, so it does not depend on what
the code under test does: a seed replays the same traffic against a redesigned controller.
Choices that depend on the run's state (which request disconnects, which engine dies) are
stored as a number `u` in [0, 1) and resolved against the state when the step runs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.config.settings import ScheduleSettings, Settings
from tests.sim.faults import FaultProfile

ADMIN_TOKEN = "sim-admin-token-0123456789abcdef"

# Virtual seconds. Small on purpose: idle stops, timeouts and takeovers happen within minutes.
TICK = 5.0  # reaper interval
LEASE = 30.0  # controller lease (renewed every 10 s; a standby polls every 10 s)
KEEP_HOT = 90.0
COLD_START_TIMEOUT = 120.0
DRAIN = 15.0
STOP_TIMEOUT = 60.0  # one provider stop (a hung one is given up and retried after this)
CALL_TIMEOUT = 30.0  # any other provider call
ORPHAN_SWEEP = 30.0  # the control loop lists the cloud's clusters and stops those nobody owns
MAX_WAITING = 6
HEARTBEAT = 60.0
MAX_GATEWAYS = 6  # processes started in one seed (restarts, standbys)
CHECK_EVERY = 10.0  # virtual seconds between the in-memory checks while time passes  # the provider's heartbeat interval; clusters delete themselves after 3 of them

AFTER_HOURS_CRON = "0 23 * * *"
PREWARM_CRON = "10 23 * * *"
PREWARM_MODELS = ("chat", "pinned")
FIRST_AFTER_HOURS = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)

SCALE_UP = 10.0  # replicas: load above the target this long adds one
SCALE_DOWN = 30.0  # and low enough for one fewer this long removes one

MODELS: dict[str, dict[str, Any]] = {
    "small": {
        "gpus_per_replica": 1,
        "priority": 0,
        "keep_hot_seconds": 30,
        "spare_seconds": 40,
        "replicas": {"min": 0, "max": 3},
        "target_in_flight_per_replica": 1,
    },
    "chat": {
        "gpus_per_replica": 1,
        "priority": 1,
        "spare_seconds": 60,
        "replicas": {"min": 0, "max": 2},
        "target_in_flight_per_replica": 1,
    },
    "big": {"gpus_per_replica": 2, "priority": 1, "keep_hot_seconds": 60},
    "pinned": {
        "gpus_per_replica": 1,
        "priority": 2,
        "replicas": {"min": 1, "max": 2},
        "target_in_flight_per_replica": 1,
    },
    "top": {"gpus_per_replica": 1, "priority": 3, "keep_hot_seconds": 45},
    "embed": {"gpus_per_replica": 1, "priority": 0, "kind": "embedding", "keep_hot_seconds": 20},
}
# Reference files an admin may switch to with a reload (0 is the one the gateway starts with).
VARIANTS: tuple[dict[str, dict[str, Any]], ...] = (
    MODELS,
    {
        **MODELS,
        "small": {**MODELS["small"], "keep_hot_seconds": 120},
        "chat": {**MODELS["chat"], "priority": 0},
        "embed": None,
    },
    {**MODELS, "top": None, "pinned": {**MODELS["pinned"], "priority": 1}},
)
MODEL_WEIGHTS = {"small": 4, "chat": 5, "big": 2, "pinned": 2, "top": 2, "embed": 2}


def variant(index: int) -> dict[str, dict[str, Any]]:
    return {m: v for m, v in VARIANTS[index].items() if v is not None}


def max_replicas(model: str) -> int:
    """The most replicas `model` may run in any variant."""
    entries = [v[model] for v in VARIANTS if v.get(model) is not None]
    return max(e.get("replicas", {}).get("max", 1) for e in entries)


def unlisted_bounds(model: str, keep_hot_patched: float | None = None) -> tuple[int, float, float]:
    """(priority, keep-hot, spare time) for an engine of `model` once the catalog no longer lists
    it: the controller keeps the keep-hot and spare time it started with (at most the highest of
    any variant, or of any keep-hot override an admin set, `keep_hot_patched`), and no priority
    pins it any more, since nothing can reach it (requests for it are 404)."""
    entries = [v[model] for v in VARIANTS if v.get(model) is not None]
    keep_hot = max(e.get("keep_hot_seconds", KEEP_HOT) for e in entries)
    return (
        0,
        max(keep_hot, keep_hot_patched) if keep_hot_patched is not None else keep_hot,
        max(e.get("spare_seconds", 0.0) for e in entries),
    )


@dataclass(frozen=True)
class Step:
    kind: str
    dt: float  # virtual seconds to let pass after the step
    model: str = ""
    n: int = 0
    u: float = 0.0
    value: Any = None
    flag: bool = False


@dataclass(frozen=True)
class Scenario:
    seed: int
    epoch: datetime
    capacity_gpus: int
    faults: FaultProfile
    standby: bool  # a second gateway stands by from the start
    reconcile_unknown: str
    steps: tuple[Step, ...] = field(repr=False)

    def settings(self, root: Path) -> Settings:
        reference = root / "model_reference.json"
        write_reference(reference, 0)
        return Settings(
            data_dir=root / "data",
            database_url=f"sqlite:///{root / 'gateway.db'}",
            model_reference=reference,
            admin_token=ADMIN_TOKEN,
            client_auth="open",  # the simulated clients carry no API key
            reaper_interval_seconds=TICK,
            controller_lease_seconds=LEASE,
            keep_hot_seconds=KEEP_HOT,
            scale_up_seconds=SCALE_UP,
            scale_down_seconds=SCALE_DOWN,
            cold_start_timeout_seconds=COLD_START_TIMEOUT,
            drain_seconds=DRAIN,
            stop_timeout_seconds=STOP_TIMEOUT,
            provider_call_timeout_seconds=CALL_TIMEOUT,
            orphan_sweep_seconds=ORPHAN_SWEEP,
            max_waiting_requests=MAX_WAITING,
            failed_model_ttl_seconds=120,
            eviction_cooldown_seconds=120,
            loading_comment_seconds=2,
            after_hours=ScheduleSettings(cron=AFTER_HOURS_CRON, timezone="UTC"),
            prewarm=[ScheduleSettings(cron=PREWARM_CRON, timezone="UTC", models=list(PREWARM_MODELS))],
            reconcile_unknown=self.reconcile_unknown,
        )


def write_reference(path: Path, index: int) -> None:
    path.write_text(json.dumps(variant(index)))


# Faults the plan injects; each seed switches each one on with probability 1/2, so that some
# seeds see no database errors (say) and the defects they would hide show.
PLAN_FAULTS = (
    "engine-crash",
    "preempt",
    "db-burst",
    "lease-loss",
    "stall",
    "kill",
    "list-outage",
    "heartbeat-outage",
)


def fault_kinds() -> tuple[str, ...]:
    """Every fault the simulator injects: per provider call (cloud.py) and per step (the plan)."""
    return (*FaultProfile.kinds(), *PLAN_FAULTS)


def parse_only(text: str | None) -> frozenset[str] | None:
    """`--only` as given: None (the seed's own mix of faults), "none", or "stop-fail,kill"."""
    if text is None or text == "mix":
        return None
    return frozenset(k for k in text.split(",") if k and k != "none")


def scenario(seed: int, steps: int, only: frozenset[str] | None = None) -> Scenario:
    """The seed's scenario; with `only`, every fault but those is switched off (empty: none)."""
    rng = random.Random(f"plan-{seed}")
    enabled = {kind for kind in PLAN_FAULTS if rng.random() < 0.5}
    epoch = FIRST_AFTER_HOURS - timedelta(seconds=round(rng.uniform(30, 420), 3))
    capacity = rng.choice((2, 3, 3, 4))
    faults = FaultProfile.draw(rng)
    if only is not None:
        unknown = only - set(fault_kinds())
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(fault_kinds())}")
        enabled, faults = set(only) & set(PLAN_FAULTS), faults.only(only)
    weights = {k: w for k, w in _KINDS.items() if k not in PLAN_FAULTS or k in enabled}
    return Scenario(
        seed=seed,
        epoch=epoch,
        capacity_gpus=capacity,
        faults=faults,
        standby=rng.random() < 0.5,
        reconcile_unknown=rng.choice(("down", "down", "adopt")),
        steps=tuple(_step(rng, weights) for _ in range(steps)),
    )


_KINDS: dict[str, float] = {
    "request": 34,
    "burst": 4,
    "disconnect": 8,
    "advance": 9,
    "admin-load": 4,
    "admin-unload": 4,
    "admin-patch": 5,
    "admin-reload": 2,
    "admin-reset": 1,
    "engine-crash": 2.5,
    "preempt": 2,
    "db-burst": 3,
    "lease-loss": 1.5,
    "stall": 1.5,
    "kill": 1.5,
    "standby": 3,
    "list-outage": 1,
    "heartbeat-outage": 1,
}


def _step(rng: random.Random, weights: dict[str, float]) -> Step:
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    dt = rng.expovariate(1 / 4) if rng.random() < 0.85 else rng.uniform(10, 60)
    model = rng.choices(list(MODEL_WEIGHTS), weights=list(MODEL_WEIGHTS.values()))[0]
    u = rng.random()
    if kind == "request":
        hold = rng.expovariate(1 / 5) if rng.random() < 0.9 else rng.uniform(20, 120)
        return Step(kind, dt, model=model, value=round(min(hold, 180.0), 3), flag=rng.random() < 0.3, u=u)
    if kind == "burst":
        return Step(kind, dt, model=model, n=rng.randint(3, 9), value=round(rng.uniform(0.5, 20), 3))
    if kind == "advance":
        return Step(kind, rng.uniform(30, 200))
    if kind == "admin-load":
        return Step(kind, dt, model=model, flag=rng.random() < 0.4)
    if kind == "admin-patch":
        field_ = rng.choice(("priority", "keep_hot_seconds"))
        value = (
            rng.choice((0, 1, 2, 3, None)) if field_ == "priority" else rng.choice((10, 40, 150, 400, None))
        )
        return Step(kind, dt, model=model, value={field_: value})
    if kind == "admin-reload":
        return Step(kind, dt, n=rng.randrange(len(VARIANTS)))
    if kind == "db-burst":
        return Step(kind, dt, n=rng.randint(1, 8), flag=rng.random() < 0.5)
    if kind == "stall":
        return Step(kind, dt, value=round(LEASE + rng.uniform(5, 60), 3))
    if kind == "list-outage":
        return Step(kind, dt, value=round(rng.uniform(30, 300), 3))
    if kind == "heartbeat-outage":  # shorter than the failsafe (3 heartbeats) less one tick
        return Step(kind, dt, value=round(rng.uniform(30, 3 * HEARTBEAT - 2 * TICK), 3))
    return Step(kind, dt, model=model, u=u)
