"""The replica policy (scaling.py) and how replicas rank as takeover victims, on a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from gateway.config.reference import ModelSpec, Replicas
from gateway.control.policies import DeploymentView, Request, choose_victim, idle_stops
from gateway.control.scaling import Autoscaler, ModelLoad, ReplicaLoad, ScaleAction, scale_down_choice
from state import DeploymentState

T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def load(ready: int, inflight: int, *, starting: int = 0, lo: int = 0, hi: int = 2) -> ModelLoad:
    return ModelLoad(
        model="m",
        ready=ready,
        starting=starting,
        load=inflight,
        min_replicas=lo,
        max_replicas=hi,
        target=4,
        up_seconds=30,
        down_seconds=60,
    )


def run(scaler: Autoscaler, moments: list[tuple[float, ModelLoad]]) -> list[tuple[float, str]]:
    out = []
    for t, state in moments:
        out.extend((t, a.direction) for a in scaler.decide([state], at(t)))
    return out


def test_sustained_load_adds_one_replica_after_scale_up_seconds() -> None:
    scaler = Autoscaler()
    moments = [(t, load(1, 9)) for t in range(0, 40, 5)]
    assert run(scaler, moments) == [(30, "up")]


def test_a_dip_restarts_the_scale_up_clock() -> None:
    scaler = Autoscaler()
    moments = [(0, load(1, 9)), (20, load(1, 9)), (25, load(1, 4)), (30, load(1, 9)), (55, load(1, 9))]
    assert run(scaler, moments) == []  # at target (not above) at t=25: high since t=30 only
    assert run(scaler, [(60, load(1, 9))]) == [(60, "up")]


def test_never_past_max_and_one_start_at_a_time() -> None:
    scaler = Autoscaler()
    assert run(scaler, [(t, load(2, 40)) for t in range(0, 200, 10)]) == []  # at max already
    assert run(scaler, [(t, load(1, 40, starting=1, hi=3)) for t in range(200, 400, 10)]) == []
    # The started replica is ready: the clock starts again from there.
    assert run(scaler, [(t, load(2, 40, hi=3)) for t in range(400, 440, 10)]) == [(430, "up")]


def test_cold_model_is_left_to_the_cold_start() -> None:
    scaler = Autoscaler()
    assert run(scaler, [(t, load(0, 50, starting=1, lo=2)) for t in range(0, 100, 10)]) == []


def test_scale_down_when_one_fewer_would_do_for_scale_down_seconds() -> None:
    scaler = Autoscaler()
    # 2 ready, 5 in flight: one replica would carry 5 > target 4, so both stay.
    assert run(scaler, [(t, load(2, 5)) for t in range(0, 200, 10)]) == []
    # 3 in flight fit one replica: after 60 s of that, one goes.
    assert run(scaler, [(t, load(2, 3)) for t in range(200, 300, 10)]) == [(260, "down")]


def test_min_is_a_floor_while_hot() -> None:
    scaler = Autoscaler()
    assert run(scaler, [(t, load(2, 0, lo=2, hi=3)) for t in range(0, 600, 30)]) == []
    # Below min (a replica was evicted or died): back up at once, one at a time.
    assert run(scaler, [(600, load(1, 0, lo=2, hi=3))]) == [(600, "up")]
    assert run(scaler, [(610, load(1, 0, starting=1, lo=2, hi=3))]) == []


def test_above_max_after_a_reload_loses_one_at_once() -> None:
    assert run(Autoscaler(), [(0, load(3, 30, hi=2))]) == [(0, "down")]


def test_default_replicas_never_scale() -> None:
    scaler = Autoscaler()
    moments = [(t, load(1, 100, hi=1)) for t in range(0, 600, 10)]
    moments += [(t, load(1, 0, hi=1)) for t in range(600, 1200, 10)]
    assert run(scaler, moments) == []


def test_reasons_say_why() -> None:
    scaler = Autoscaler()
    scaler.decide([load(1, 9)], at(0))
    [action] = scaler.decide([load(1, 9)], at(30))
    assert action == ScaleAction("m", "up", action.reason)
    assert "9.0 in flight per ready replica > target 4" in action.reason


def test_scale_down_picks_fewest_in_flight_then_newest() -> None:
    replicas = [
        ReplicaLoad("old", 0, at(0)),
        ReplicaLoad("new", 0, at(100)),
        ReplicaLoad("busy", 3, at(200)),
    ]
    assert scale_down_choice(replicas) == "new"
    assert scale_down_choice([ReplicaLoad("a", 2, at(0)), ReplicaLoad("b", 1, at(0))]) == "b"
    assert scale_down_choice([]) is None


def test_replicas_bounds_are_validated() -> None:
    assert ModelSpec(id="m").replicas == Replicas(min=0, max=1)
    with pytest.raises(ValidationError, match=r"replicas.min \(3\) must not exceed replicas.max \(2\)"):
        ModelSpec.model_validate({"id": "m", "replicas": {"min": 3, "max": 2}})
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({"id": "m", "replicas": {"max": 0}})


# -- replicas among takeover victims and idle stops ----------------------------------------


def view(dep: str, model: str, prio: int, *, replicas: int = 1, in_flight: int = 0) -> DeploymentView:
    return DeploymentView(
        deployment_id=dep,
        model=model,
        state=DeploymentState.READY,
        priority=prio,
        keep_hot_seconds=600,
        last_used=T0,
        in_flight=in_flight,
        replicas=replicas,
    )


def victim(views: list[DeploymentView], request: Request) -> str | None:
    chosen = choose_victim(views, request, evictions=[], now=T0, cooldown_seconds=0)
    return chosen.deployment_id if chosen else None


def test_extra_replicas_are_the_first_victims() -> None:
    low = view("low", "low", 0)
    hot = [view("hot-1", "hot", 3, replicas=2, in_flight=5), view("hot-2", "hot", 3, replicas=2, in_flight=5)]
    # A priority-1 cold start evicts a busy extra replica of a priority-3 model before an idle
    # priority-0 model's only engine.
    assert victim([low, *hot], Request("mid", 1, 1)) in ("hot-1", "hot-2")
    # The extras of a pinned model too; never its last replica.
    pinned = [view("p-1", "pinned", 2, replicas=2), view("p-2", "pinned", 2, replicas=2)]
    assert victim(pinned, Request("mid", 1, 1)) in ("p-1", "p-2")
    assert victim([view("p-1", "pinned", 2)], Request("top", 5, 1)) is None


def test_an_extra_replica_evicts_only_lower_priority_extras() -> None:
    low_only = view("low", "low", 0)
    scale_up = Request("top", 3, 1, extra=True)
    assert victim([low_only], scale_up) is None  # a last replica outranks any scale-up
    assert victim([view("l-1", "low", 0, replicas=2), view("l-2", "low", 0, replicas=2)], scale_up) == "l-1"
    assert victim([view("t-1", "top2", 3, replicas=2), view("t-2", "top2", 3, replicas=2)], scale_up) is None
    # Never its own model's replicas.
    assert victim([view("o-1", "top", 0, replicas=2), view("o-2", "top", 0, replicas=2)], scale_up) is None


def test_idle_is_judged_on_the_whole_model() -> None:
    old = DeploymentView("a", "m", DeploymentState.READY, 0, 60, T0 - timedelta(seconds=120), in_flight=1)
    idle = DeploymentView("b", "m", DeploymentState.READY, 0, 60, T0 - timedelta(seconds=120), in_flight=0)
    assert idle_stops([old, idle], T0) == []  # a request in flight on one replica keeps both
    assert {a.deployment_id for a in idle_stops([idle], T0)} == {"b"}
