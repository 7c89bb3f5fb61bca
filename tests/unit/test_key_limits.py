"""The sliding-window counter of per-key limits, and the key records' checks."""

from __future__ import annotations

from gateway.auth.keys import hash_key, new_secret, patterns_of
from gateway.auth.limits import SlidingWindow


def test_a_window_admits_up_to_the_limit_then_says_how_long_to_wait() -> None:
    w = SlidingWindow()
    for _ in range(3):
        assert w.retry_after(100.0, 3) == 0
        w.add(100.0)
    # All three are in this minute: a fourth fits once a third of them slid out, at 160 + 20 s.
    assert w.retry_after(100.0, 3) == 80
    assert w.retry_after(159.0, 3) == 21
    # In the next window the previous one's count slides out: at 160 + 20 s, 2/3 of it remain.
    assert w.used(180.0) == 2.0
    assert w.retry_after(180.0, 3) == 0


def test_the_previous_window_weighs_what_is_left_of_it() -> None:
    w = SlidingWindow()
    w.add(0.0, 60)
    assert w.used(30.0) == 60
    assert w.used(90.0) == 30  # at 90: half of [0, 60) is inside the last 60 s
    assert w.retry_after(90.0, 40, 20) == 10  # 20 more fit once 10 more seconds slid out
    assert w.used(200.0) == 0  # two windows later: nothing left


def test_tokens_added_after_the_fact_count_against_the_next_request() -> None:
    w = SlidingWindow()
    w.add(5.0, 9)
    assert w.retry_after(6.0, 10) == 0
    w.add(6.0, 9)
    assert w.retry_after(7.0, 10) > 0


def test_keys_are_high_entropy_and_hashed() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("sk-gw-") and len(a) == len("sk-gw-") + 43
    assert hash_key(a) != hash_key(b) and len(hash_key(a)) == 64 and a not in hash_key(a)
    assert patterns_of('["org/*", 3, "x"]') == ("org/*", "x")
    assert patterns_of("not json") == () and patterns_of('{"a": 1}') == ()
