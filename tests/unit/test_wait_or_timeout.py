"""`wait_or_timeout` ends with its caller's cancellation, even one that comes just as the event
is set (Python 3.11's `asyncio.wait_for` swallowed it there: a loop cancelled by its gateway's
shutdown ran on, and the shutdown waited for it forever)."""

from __future__ import annotations

import asyncio

from gateway.fleet.follower import wait_or_timeout


async def test_a_cancellation_as_the_event_is_set_ends_the_loop() -> None:
    for turns in range(4):  # where the cancellation lands around the wake-up
        event = asyncio.Event()

        async def loop(event: asyncio.Event) -> None:
            while True:
                await wait_or_timeout(event, 10)
                event.clear()

        task = asyncio.create_task(loop(event))
        await asyncio.sleep(0)  # waiting
        event.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait([task], timeout=1)
        assert task.cancelled(), f"the loop ran on after its cancellation ({turns} turns)"


async def test_the_timeout_and_the_event_end_the_wait() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await wait_or_timeout(event, 0.05)
    assert loop.time() - t0 >= 0.05
    loop.call_later(0.01, event.set)
    await wait_or_timeout(event, 10)
    assert event.is_set()
