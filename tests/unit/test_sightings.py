"""Until when a cluster found gone is billed (gateway/control/sightings.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.control.sightings import Sightings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL = 60.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_never_seen_or_no_heartbeats_bills_until_found() -> None:
    assert Sightings().gone_by(at(500), INTERVAL) == at(500)
    seen = Sightings()
    seen.armed_at(at(0))
    assert seen.gone_by(at(500), None) == at(500)


def test_answered_heartbeats_bound_it_by_the_one_due_after_the_last_sighting() -> None:
    s = Sightings()
    s.armed_at(at(0))
    assert s.gone_by(at(200), INTERVAL) == at(60)  # found late (a stalled gateway): bills no more
    assert s.gone_by(at(40), INTERVAL) == at(40)  # never past the moment it was found
    s.healthy_at(at(100))
    assert s.gone_by(at(200), INTERVAL) == at(160)


def test_an_unanswered_heartbeat_bills_until_the_failsafe() -> None:
    s = Sightings()
    s.armed_at(at(0))
    s.unanswered()  # the API is down: nobody looked at it since
    assert s.gone_by(at(500), INTERVAL) == at(180)  # its failsafe: 3 intervals after the re-arm
    assert s.gone_by(at(120), INTERVAL) == at(120)


def test_a_sighting_after_an_unanswered_heartbeat_ends_the_blind_stretch() -> None:
    s = Sightings()
    s.armed_at(at(0))
    s.unanswered()
    s.healthy_at(at(100))  # a probe found the engine answering
    assert s.gone_by(at(500), INTERVAL) == at(160)
    s.unanswered()
    assert s.gone_by(at(500), INTERVAL) == at(180)
    s.healthy_at(at(250))  # seen past its failsafe: a heartbeat that timed out re-armed it after all
    s.unanswered()
    assert s.gone_by(at(500), INTERVAL) == at(250)


def test_adopted_and_never_re_armed_here_bills_until_found_once_blind() -> None:
    s = Sightings()
    s.healthy_at(at(0))
    s.unanswered()
    assert s.gone_by(at(500), INTERVAL) == at(500)
