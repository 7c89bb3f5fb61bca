"""Eviction, after-hours, pre-warm and failure expiry: pure functions with a fake clock."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.control.policies import (
    DeploymentView,
    Eviction,
    Request,
    Schedule,
    after_hours_stops,
    choose_victim,
    cron_fired,
    expired_failures,
    idle_stops,
    prewarm_due,
)
from state import DeploymentState

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
CHICAGO = ZoneInfo("America/Chicago")


def view(
    model: str,
    *,
    prio: int = 0,
    gpus: int = 1,
    in_flight: int = 0,
    idle: float = 100,
    accel: tuple[str, ...] = (),
    state: DeploymentState = DeploymentState.READY,
) -> DeploymentView:
    return DeploymentView(
        deployment_id=f"d-{model}",
        model=model,
        state=state,
        priority=prio,
        keep_hot_seconds=600,
        last_used=NOW - timedelta(seconds=idle),
        in_flight=in_flight,
        gpus=gpus,
        accelerators=accel,
    )


def pick(views: list[DeploymentView], request: Request, evictions: tuple[Eviction, ...] = ()) -> str | None:
    victim = choose_victim(views, request, evictions=list(evictions), now=NOW, cooldown_seconds=600)
    return victim.model if victim else None


HIGH = Request(model="high", priority=1, gpus=1)


def test_only_strictly_lower_priority_and_never_pinned() -> None:
    assert pick([view("same", prio=1)], HIGH) is None
    assert pick([view("higher", prio=2)], Request(model="x", priority=1, gpus=1)) is None
    assert pick([view("pinned", prio=2)], Request(model="top", priority=5, gpus=1)) is None
    assert pick([view("low", prio=0)], HIGH) == "low"
    assert pick([view("high", prio=0)], HIGH) is None  # never itself


def test_gpus_and_accelerators_must_fit() -> None:
    big = Request(model="big", priority=1, gpus=4)
    assert pick([view("small", gpus=2)], big) is None
    assert pick([view("small", gpus=2), view("large", gpus=8)], big) == "large"
    a100 = Request(model="m", priority=1, gpus=1, accelerators=("A100", "H100"))
    assert pick([view("l4", accel=("L4",))], a100) is None
    assert pick([view("l4", accel=("L4",)), view("h100", accel=("H100",))], a100) == "h100"
    assert pick([view("local-slot")], a100) == "local-slot"  # local slots have no type
    assert pick([view("l4", accel=("L4",))], HIGH) == "l4"  # the request accepts any type


def test_only_ready_deployments() -> None:
    for state in (DeploymentState.LOADING, DeploymentState.DRAINING, DeploymentState.STOPPING):
        assert pick([view("low", state=state)], HIGH) is None


def test_preference_order() -> None:
    # no requests in flight beats lower priority
    assert (
        pick(
            [view("busy", prio=0, in_flight=3), view("idle", prio=0), view("busy0", in_flight=1)],
            Request(model="x", priority=3, gpus=1),
        )
        == "idle"
    )
    assert (
        pick([view("p1", prio=1), view("p0", prio=0, in_flight=1)], Request(model="x", priority=2, gpus=1))
        == "p1"
    )
    # then the lowest priority
    assert (
        pick(
            [view("p1", prio=1, idle=9999), view("p0", prio=0, idle=1)],
            Request(model="x", priority=3, gpus=1),
        )
        == "p0"
    )
    # then least recently used
    assert pick([view("recent", idle=5), view("old", idle=500)], HIGH) == "old"
    # then the fewest wasted GPUs
    assert (
        pick(
            [view("eight", gpus=8, idle=50), view("two", gpus=2, idle=50)],
            Request(model="x", priority=1, gpus=2),
        )
        == "two"
    )
    # busy ones are still candidates when nothing else fits
    assert pick([view("busy", in_flight=2)], HIGH) == "busy"


def test_no_thrash_within_cooldown() -> None:
    evicted_by_low = Eviction(victim="high", by="low", at=NOW - timedelta(seconds=100))
    assert pick([view("low")], HIGH, (evicted_by_low,)) is None
    old = Eviction(victim="high", by="low", at=NOW - timedelta(seconds=601))
    assert pick([view("low")], HIGH, (old,)) == "low"
    other = Eviction(victim="high", by="someone-else", at=NOW)
    assert pick([view("low")], HIGH, (other,)) == "low"


def test_pinned_survives_idleness_but_not_after_hours() -> None:
    views = [
        view("pinned", prio=2, idle=10**6),
        view("busy", in_flight=1, idle=10**6),
        view("p0", idle=10**6),
    ]
    assert [a.model for a in idle_stops(views, NOW)] == ["p0"]
    schedule = Schedule(cron="0 23 * * *", timezone="America/Chicago")
    before = datetime(2026, 6, 1, 22, 59, tzinfo=CHICAGO)
    after = datetime(2026, 6, 1, 23, 0, 1, tzinfo=CHICAGO)
    stops = after_hours_stops(views, schedule, before, after)
    assert sorted(a.model for a in stops) == ["busy", "p0", "pinned"]
    assert all(a.kind == "after-hours-stop" for a in stops)
    assert after_hours_stops(views, schedule, after, after + timedelta(minutes=1)) == []
    assert after_hours_stops(views, None, before, after) == []


def utc(y: int, mo: int, d: int, h: int, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


def test_after_hours_on_both_sides_of_dst_changes() -> None:
    cron, tz = "0 23 * * *", "America/Chicago"
    # 2026-03-08: CST (UTC-6) -> CDT (UTC-5). 23:00 local is 05:00 UTC before, 04:00 UTC after.
    assert cron_fired(cron, tz, utc(2026, 3, 8, 4, 59), utc(2026, 3, 8, 5, 0))  # Mar 7 23:00 CST
    assert not cron_fired(cron, tz, utc(2026, 3, 8, 5, 1), utc(2026, 3, 9, 3, 59))
    assert cron_fired(cron, tz, utc(2026, 3, 9, 3, 59), utc(2026, 3, 9, 4, 0))  # Mar 8 23:00 CDT
    # 2026-11-01: CDT -> CST. Oct 31 23:00 CDT is 04:00 UTC; Nov 1 23:00 CST is 05:00 UTC.
    assert cron_fired(cron, tz, utc(2026, 11, 1, 3, 59), utc(2026, 11, 1, 4, 0))
    assert not cron_fired(cron, tz, utc(2026, 11, 2, 4, 0), utc(2026, 11, 2, 4, 59))  # 22:00-22:59 CST
    assert cron_fired(cron, tz, utc(2026, 11, 2, 4, 59), utc(2026, 11, 2, 5, 0))
    # Each firing is seen once by consecutive ticks, never twice, never skipped.
    ticks = [utc(2026, 3, 1, 0) + timedelta(minutes=7 * i) for i in range(int(14 * 24 * 60 / 7))]
    fired = [b for a, b in itertools.pairwise(ticks) if cron_fired(cron, tz, a, b)]
    assert len(fired) == 14
    assert all(f.astimezone(ZoneInfo(tz)).hour == 23 for f in fired)


def test_prewarm() -> None:
    weekdays = Schedule(cron="30 8 * * 1-5", timezone="America/Chicago", models=("a", "b"))
    also = Schedule(cron="30 8 * * *", timezone="America/Chicago", models=("b", "c"))
    monday_0829 = datetime(2026, 6, 1, 8, 29, tzinfo=CHICAGO)  # 2026-06-01 is a Monday
    assert prewarm_due([weekdays, also], monday_0829, monday_0829 + timedelta(minutes=2)) == ["a", "b", "c"]
    assert (
        prewarm_due([weekdays, also], monday_0829 + timedelta(minutes=2), monday_0829 + timedelta(hours=1))
        == []
    )
    saturday = datetime(2026, 6, 6, 8, 29, tzinfo=CHICAGO)
    assert prewarm_due([weekdays, also], saturday, saturday + timedelta(minutes=2)) == ["b", "c"]


def test_failure_expiry() -> None:
    failed = {"a": NOW - timedelta(seconds=601), "b": NOW - timedelta(seconds=10)}
    assert expired_failures(failed, NOW, 600) == ["a"]
    assert sorted(expired_failures(failed, NOW, 0)) == ["a", "b"]
