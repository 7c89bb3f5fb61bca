"""Control decisions as pure functions of (state, now). No I/O, no logging: the reaper applies
the actions they return and writes the events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from state.machine import DeploymentState

# Models of this priority or higher are never stopped for idleness (the old system's rule).
PINNED_PRIORITY = 2


@dataclass(frozen=True)
class DeploymentView:
    """What the policies need to know about one live deployment."""

    deployment_id: str
    model: str
    state: DeploymentState
    priority: int
    keep_hot_seconds: float
    last_used: datetime  # last request, or when it became ready if it has served none
    in_flight: int = 0
    gpus: int = 1


@dataclass(frozen=True)
class StopAction:
    deployment_id: str
    model: str
    kind: str  # the event kind: idle-stop, ...
    reason: str


def idle_seconds(view: DeploymentView, now: datetime) -> float:
    return (now - view.last_used).total_seconds()


def idle_stops(views: Iterable[DeploymentView], now: datetime) -> list[StopAction]:
    """Ready deployments idle longer than their keep-hot time, with no request in flight,
    unless pinned by priority."""
    actions = []
    for view in views:
        if view.state is not DeploymentState.READY or view.in_flight > 0:
            continue
        if view.priority >= PINNED_PRIORITY:
            continue
        idle = idle_seconds(view, now)
        if idle > view.keep_hot_seconds:
            actions.append(
                StopAction(
                    deployment_id=view.deployment_id,
                    model=view.model,
                    kind="idle-stop",
                    reason=f"idle {idle:.0f}s > keep_hot_seconds {view.keep_hot_seconds:g}",
                )
            )
    return actions


def heartbeats_due(
    views: Iterable[DeploymentView], last_beat: Mapping[str, datetime], now: datetime, interval_seconds: float
) -> list[str]:
    """Deployments holding an engine (loading or ready) whose last failsafe heartbeat is at
    least `interval_seconds` old (or never sent)."""
    due = []
    for view in views:
        if view.state not in (DeploymentState.LOADING, DeploymentState.READY):
            continue
        last = last_beat.get(view.deployment_id)
        if last is None or (now - last).total_seconds() >= interval_seconds:
            due.append(view.deployment_id)
    return due
