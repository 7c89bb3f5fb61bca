from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.control.policies import DeploymentView, idle_stops
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


def test_pure_and_repeatable() -> None:
    views = [view(idle=700)]
    assert idle_stops(views, NOW) == idle_stops(views, NOW)
    assert idle_stops(views, NOW - timedelta(seconds=200)) == []
