"""Control decisions as pure functions of (state, now). No I/O, no logging: the reaper applies
the actions they return and writes the events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

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
    accelerators: tuple[str, ...] = ()  # GPU types of the cluster it runs on; () = unknown / local slots
    spare_seconds: float = 0.0  # how long it stays up as a spare once its keep-hot time is over
    spare_since: datetime | None = None  # when it became a spare (state SPARE)
    replicas: int = 1  # ready replicas of its model serving now (this one included if serving)
    # The catalog lists its model. A reload that removes the model leaves its engines running
    # (they finish what they serve) but unreachable: requests for it, unload and patch are 404.
    listed: bool = True

    @property
    def extra(self) -> bool:
        """One of several ready replicas: its model goes on serving without it."""
        return self.replicas > 1


@dataclass(frozen=True)
class StopAction:
    deployment_id: str
    model: str
    kind: str  # the event kind: idle-stop, ...
    reason: str
    spare: bool = False  # the cluster may stay up as a spare first (its model's spare_seconds)


def idle_seconds(view: DeploymentView, now: datetime) -> float:
    return (now - view.last_used).total_seconds()


def busy_models(views: Iterable[DeploymentView]) -> set[str]:
    """Models with a request in flight on one of their replicas."""
    return {view.model for view in views if view.in_flight > 0}


def idle_stops(
    views: Iterable[DeploymentView], now: datetime, busy: set[str] | None = None
) -> list[StopAction]:
    """Ready deployments idle longer than their keep-hot time, unless pinned by priority.
    Idleness is the model's: no replica of it may have a request in flight (`busy`: the models
    with one, if `views` are a slice of all the deployments). A model the catalog no longer
    lists is pinned no more: nothing can reach its engine, so it goes at its keep-hot time."""
    views = list(views)
    if busy is None:
        busy = busy_models(views)
    actions = []
    for view in views:
        if view.state is not DeploymentState.READY or view.model in busy:
            continue
        if view.priority >= PINNED_PRIORITY and view.listed:
            continue
        idle = idle_seconds(view, now)
        if idle > view.keep_hot_seconds:
            actions.append(
                StopAction(
                    deployment_id=view.deployment_id,
                    model=view.model,
                    kind="idle-stop",
                    reason=f"idle {idle:.0f}s > keep_hot_seconds {view.keep_hot_seconds:g}",
                    spare=view.spare_seconds > 0,
                )
            )
    return actions


def spare_expiries(views: Iterable[DeploymentView], now: datetime) -> list[StopAction]:
    """Spares kept longer than their `spare_seconds`: stopped."""
    actions = []
    for view in views:
        if view.state is not DeploymentState.SPARE or view.spare_since is None:
            continue
        kept = (now - view.spare_since).total_seconds()
        if kept > view.spare_seconds:
            actions.append(
                StopAction(
                    deployment_id=view.deployment_id,
                    model=view.model,
                    kind="spare-expired",
                    reason=f"spare for {kept:.0f}s > spare_seconds {view.spare_seconds:g}",
                )
            )
    return actions


def choose_spare(views: Iterable[DeploymentView], model: str) -> DeploymentView | None:
    """Of the spares that fit a cold start of `model` (the provider said so), the one to swap
    onto: the model's own, else the one closest to its expiry."""
    spares = [(v, v.spare_since) for v in views if v.state is DeploymentState.SPARE and v.spare_since]
    if not spares:
        return None
    return min(spares, key=lambda s: (s[0].model != model, s[1] + timedelta(seconds=s[0].spare_seconds)))[0]


_HOLDING = frozenset(
    {DeploymentState.LOADING, DeploymentState.READY, DeploymentState.DRAINING, DeploymentState.SPARE}
)


def heartbeats_due(
    views: Iterable[DeploymentView], last_beat: Mapping[str, datetime], now: datetime, interval_seconds: float
) -> list[str]:
    """Deployments holding an engine (loading, ready, draining or spare) whose last failsafe heartbeat
    is at least `interval_seconds` old (or never sent)."""
    due = []
    for view in views:
        if view.state not in _HOLDING:
            continue
        last = last_beat.get(view.deployment_id)
        if last is None or (now - last).total_seconds() >= interval_seconds:
            due.append(view.deployment_id)
    return due


# -- capacity takeover -------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A model that could not get GPUs and looks for a cluster to take over."""

    model: str
    priority: int
    gpus: int
    accelerators: tuple[str, ...] = ()  # allowed GPU types (any of); () = any
    extra: bool = False  # a further replica of a model that is serving already (a scale-up)


def outranks(request: Request, view: DeploymentView) -> bool:
    """Whether `request` may evict `view`. The first replica of a model outranks every extra
    replica (of any model and priority); otherwise the higher priority wins, and a pinned
    model's last replica is never evicted. An extra replica thus only ever evicts extra
    replicas of lower-priority models."""
    if request.extra != view.extra:
        return view.extra
    if not view.extra and view.priority >= PINNED_PRIORITY:
        return False
    return view.priority < request.priority


@dataclass(frozen=True)
class Eviction:
    """`victim` was evicted by `by` at `at` (remembered to prevent thrash)."""

    victim: str
    by: str
    at: datetime


def eligible_victim(
    view: DeploymentView,
    request: Request,
    evictions: Sequence[Eviction],
    now: datetime,
    cooldown_seconds: float,
) -> bool:
    if view.state is not DeploymentState.READY or view.model == request.model:
        return False
    if not outranks(request, view):
        return False
    if view.gpus < request.gpus:
        return False
    if request.accelerators and view.accelerators and not set(request.accelerators) & set(view.accelerators):
        return False
    # No thrash: a model evicted by X cannot evict X back within the cooldown.
    return not any(
        e.victim == request.model and e.by == view.model and (now - e.at).total_seconds() < cooldown_seconds
        for e in evictions
    )


def choose_victim(
    views: Iterable[DeploymentView],
    request: Request,
    *,
    evictions: Sequence[Eviction],
    now: datetime,
    cooldown_seconds: float,
) -> DeploymentView | None:
    """The ready deployment to hand over to `request`, or None. Among the deployments it
    outranks (`outranks`) with compatible accelerators and enough GPUs, prefer: extra replicas,
    then no requests in flight, then the lowest priority, then least recently used, then the
    fewest GPUs wasted."""
    candidates = [v for v in views if eligible_victim(v, request, evictions, now, cooldown_seconds)]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda v: (not v.extra, v.in_flight > 0, v.priority, v.last_used, v.gpus - request.gpus),
    )


# -- schedules ------------------------------------------------------------------------------


def cron_fired(expression: str, timezone: str, since: datetime, now: datetime) -> bool:
    """Whether `expression`, read in `timezone`, has a firing time in (since, now].

    Times are computed in the zone, so `0 23 * * *` is 23:00 local time on both sides of a
    DST change."""
    if now <= since:
        return False
    zone = ZoneInfo(timezone)
    nxt = croniter(expression, since.astimezone(zone)).get_next(datetime)
    return bool(nxt <= now.astimezone(zone))


@dataclass(frozen=True)
class Schedule:
    cron: str
    timezone: str
    models: tuple[str, ...] = ()


def after_hours_stops(
    views: Iterable[DeploymentView], schedule: Schedule | None, since: datetime, now: datetime
) -> list[StopAction]:
    """At each firing of the after-hours schedule, every live deployment is stopped, pinned
    ones and spares included."""
    if schedule is None or not cron_fired(schedule.cron, schedule.timezone, since, now):
        return []
    return [
        StopAction(
            deployment_id=v.deployment_id,
            model=v.model,
            kind="after-hours-stop",
            reason=f"after hours ({schedule.cron} {schedule.timezone})",
        )
        for v in views
        if v.state
        in (
            DeploymentState.PENDING,
            DeploymentState.LAUNCHING,
            DeploymentState.LOADING,
            DeploymentState.READY,
            DeploymentState.SPARE,
        )
    ]


def prewarm_due(schedules: Iterable[Schedule], since: datetime, now: datetime) -> list[str]:
    """Models whose pre-warm schedule fired in (since, now], each once, in schedule order."""
    due: list[str] = []
    for schedule in schedules:
        if cron_fired(schedule.cron, schedule.timezone, since, now):
            due.extend(m for m in schedule.models if m not in due)
    return due


def expired_failures(failed_at: Mapping[str, datetime], now: datetime, ttl_seconds: float) -> list[str]:
    """Failed-model memories older than the TTL."""
    ttl = timedelta(seconds=ttl_seconds)
    return [model for model, at in failed_at.items() if now - at >= ttl]
