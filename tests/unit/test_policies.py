from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from gateway.control.policies import (
    DeploymentView,
    Schedule,
    after_hours_stops,
    choose_spare,
    heartbeats_due,
    idle_stops,
    spare_expiries,
)
from state import DeploymentState

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def view(
    model: str = "m",
    *,
    idle: float,
    keep: float = 600,
    prio: int = 0,
    in_flight: int = 0,
    state: DeploymentState = DeploymentState.READY,
) -> DeploymentView:
    return DeploymentView(
        deployment_id=f"d-{model}",
        model=model,
        state=state,
        priority=prio,
        keep_hot_seconds=keep,
        last_used=NOW - timedelta(seconds=idle),
        in_flight=in_flight,
    )


def test_idle_past_keep_hot_is_stopped() -> None:
    [action] = idle_stops([view(idle=601)], NOW)
    assert (action.model, action.kind) == ("m", "idle-stop")
    assert "601" in action.reason and "600" in action.reason


def test_matrix() -> None:
    views = [
        view("fresh", idle=599),
        view("exactly", idle=600),
        view("busy", idle=10_000, in_flight=1),
        view("pinned", idle=10_000, prio=2),
        view("pinned-high", idle=10_000, prio=9),
        view("prio1", idle=10_000, prio=1),
        view("loading", idle=10_000, state=DeploymentState.LOADING),
        view("stopping", idle=10_000, state=DeploymentState.STOPPING),
        view("short", idle=6, keep=5),
        view("zero", idle=0.5, keep=0),
    ]
    assert sorted(a.model for a in idle_stops(views, NOW)) == ["prio1", "short", "zero"]


def test_a_model_no_longer_listed_is_pinned_no_more() -> None:
    listed, unlisted = view("pinned", idle=10_000, prio=2), view("gone", idle=10_000, prio=3)
    unlisted = replace(unlisted, listed=False)
    assert [a.model for a in idle_stops([listed, unlisted], NOW)] == ["gone"]
    fresh = replace(unlisted, last_used=NOW - timedelta(seconds=599))
    assert idle_stops([fresh], NOW) == []  # still its keep-hot time


def test_pure_and_repeatable() -> None:
    views = [view(idle=700)]
    assert idle_stops(views, NOW) == idle_stops(views, NOW)
    assert idle_stops(views, NOW - timedelta(seconds=200)) == []


def spare(model: str, *, since: float, keep: float = 300) -> DeploymentView:
    return DeploymentView(
        deployment_id=f"d-{model}",
        model=model,
        state=DeploymentState.SPARE,
        priority=0,
        keep_hot_seconds=60,
        last_used=NOW - timedelta(seconds=since + 60),
        spare_seconds=keep,
        spare_since=NOW - timedelta(seconds=since),
    )


def test_idle_stop_may_keep_a_spare_and_spares_expire() -> None:
    ready = DeploymentView(
        deployment_id="d-r",
        model="r",
        state=DeploymentState.READY,
        priority=0,
        keep_hot_seconds=60,
        last_used=NOW - timedelta(seconds=61),
        spare_seconds=300,
    )
    [action] = idle_stops([ready, spare("s", since=1000)], NOW)  # a spare is not idle-stopped again
    assert action.model == "r" and action.spare
    assert not idle_stops([view(idle=601)], NOW)[0].spare
    [expired] = spare_expiries([spare("old", since=301), spare("young", since=299), ready], NOW)
    assert (expired.model, expired.kind) == ("old", "spare-expired")


def test_choose_spare_prefers_the_models_own_then_the_closest_to_expiry() -> None:
    spares = [spare("x", since=10), spare("y", since=200), spare("m", since=0)]
    assert choose_spare(spares, "m") == spares[2]
    assert choose_spare(spares, "other") == spares[1]
    assert choose_spare([view(idle=5)], "m") is None  # ready ones are not spares


def test_after_hours_and_heartbeats_cover_spares() -> None:
    views = [spare("s", since=10)]
    [action] = after_hours_stops(
        views, Schedule(cron="0 23 * * *", timezone="UTC"), NOW, NOW + timedelta(hours=12)
    )
    assert action.model == "s"
    assert heartbeats_due(views, {}, NOW, 600) == ["d-s"]
