"""Replicas for hot models: when to add one and when to remove one. Pure: no I/O, no logging;
the controller applies what `Autoscaler.decide` returns, at each control loop tick.

The load of a model is its requests in flight plus those waiting for it. A replica is added
when the load per ready replica stays above the model's target for `up_seconds`; one is removed
when the load would stay at or below the target with one replica fewer for `down_seconds` (the
hysteresis: removing a replica never makes the rest exceed the target, so no flapping). A hot
model below its `min` gets a replica at once, one above its `max` (lowered by a reload) loses one. At most one replica of a model starts at a time,
and a model with no ready replica is left to the cold start (its first request starts it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal


@dataclass(frozen=True)
class ModelLoad:
    """One model's replicas and load, as the control loop sees it at one tick."""

    model: str
    ready: int  # replicas serving
    starting: int  # replicas coming up
    load: int  # requests in flight plus waiting
    min_replicas: int
    max_replicas: int
    target: float  # in flight per replica
    up_seconds: float
    down_seconds: float

    @property
    def floor(self) -> int:
        return max(self.min_replicas, 1)


@dataclass(frozen=True)
class ScaleAction:
    model: str
    direction: Literal["up", "down"]
    reason: str


class Autoscaler:
    """Remembers since when each model's load has been high (or low) enough to act."""

    def __init__(self) -> None:
        self._high_since: dict[str, datetime] = {}
        self._low_since: dict[str, datetime] = {}

    def decide(self, loads: Iterable[ModelLoad], now: datetime) -> list[ScaleAction]:
        actions = []
        seen = set()
        for load in loads:
            seen.add(load.model)
            action = self._decide(load, now)
            if action is not None:
                actions.append(action)
        for memory in (self._high_since, self._low_since):
            for model in [m for m in memory if m not in seen]:
                del memory[model]  # no replica any more: it starts from scratch
        return actions

    def _decide(self, load: ModelLoad, now: datetime) -> ScaleAction | None:
        model = load.model
        if load.ready == 0:  # cold or starting: the cold start owns it
            self._forget(model)
            return None
        per_replica = load.load / load.ready
        if load.ready > load.max_replicas:  # max lowered (a reload): one at a time, at once
            self._forget(model)
            return ScaleAction(model, "down", f"{load.ready} ready > replicas.max {load.max_replicas}")
        if load.ready + load.starting < load.floor:
            self._forget(model)
            if load.starting == 0:
                return ScaleAction(model, "up", f"{load.ready} ready < replicas.min {load.min_replicas}")
            return None
        if per_replica > load.target:
            self._low_since.pop(model, None)
            if load.starting > 0 or load.ready >= load.max_replicas:
                self._high_since.pop(model, None)  # a new replica changes the picture: wait for it
                return None
            since = self._high_since.setdefault(model, now)
            held = (now - since).total_seconds()
            if held >= load.up_seconds:
                self._forget(model)
                return ScaleAction(
                    model,
                    "up",
                    f"{per_replica:.1f} in flight per ready replica > target {load.target:g} "
                    f"for {held:.0f}s ({load.ready} ready, max {load.max_replicas})",
                )
            return None
        self._high_since.pop(model, None)
        if load.ready <= load.floor or load.load > load.target * (load.ready - 1):
            self._low_since.pop(model, None)
            return None
        since = self._low_since.setdefault(model, now)
        held = (now - since).total_seconds()
        if held < load.down_seconds:
            return None
        self._forget(model)
        return ScaleAction(
            model,
            "down",
            f"{load.load} in flight fit {load.ready - 1} replicas at target {load.target:g} "
            f"for {held:.0f}s ({load.ready} ready, min {load.min_replicas})",
        )

    def _forget(self, model: str) -> None:
        self._high_since.pop(model, None)
        self._low_since.pop(model, None)


@dataclass(frozen=True)
class ReplicaLoad:
    deployment_id: str
    in_flight: int
    ready_at: datetime


def scale_down_choice(replicas: Iterable[ReplicaLoad]) -> str | None:
    """The replica to remove: the one with the fewest requests in flight (it drains fastest),
    the newest among equals (the oldest has served longest, its caches are warm)."""
    ordered = sorted(replicas, key=lambda r: (r.in_flight, -r.ready_at.timestamp()))
    return ordered[0].deployment_id if ordered else None
