"""The schedules' firings (after hours, pre-warm) as the simulator sees them: when they fire in
virtual time, what ran at an after-hours firing, and the check that it is gone by the deadline."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from croniter import croniter

from tests.sim.plan import AFTER_HOURS_CRON, DRAIN, PREWARM_CRON, PREWARM_MODELS, TICK
from tests.sim.store_view import TERMINAL

if TYPE_CHECKING:
    from tests.sim.sim import Sim


def install(sim: Sim) -> None:
    """The firings of the after-hours and pre-warm schedules during the run, as virtual times."""
    start = sim.scenario.epoch
    horizon = start + timedelta(hours=6)
    for cron, out in ((AFTER_HOURS_CRON, sim.after_hours_at), (PREWARM_CRON, sim.prewarm_at)):
        it = croniter(cron, start)
        while (at := it.get_next(datetime)) < horizon:
            out.append((at - start).total_seconds())
    for firing in sim.after_hours_at:
        sim.loop.call_at(firing, _after_hours_fired, sim, firing)
    for firing in sim.prewarm_at:
        sim.loop.call_at(firing, _prewarm_fired, sim)


def _after_hours_fired(sim: Sim, firing: float) -> None:
    """Remember what runs at the firing; check at the deadline that it is gone, if one and the
    same lease holder was there to see the firing and stayed up (a standby that takes over
    later must not replay the firing)."""
    live = {c.deployment_id for c in sim.cloud.clusters.values()}
    live |= {r.id for r in sim.view.rows() if r.state not in TERMINAL}
    holder = sim.checker.holder()
    sim.log(f"after hours fired ({len(live)} live deployments, holder {holder.name if holder else None})")
    deadline = firing + TICK + DRAIN + sim.cloud.durations.stop_max + TICK

    def check() -> None:
        if holder is None or holder.state not in ("serving", "stopping") or holder.name in sim.loop.frozen:
            return
        if any(start < deadline and end > firing for start, end in holder.stalls):
            return
        sim.checker.after_hours(firing, live)

    sim.loop.call_at(deadline, check)


def _prewarm_fired(sim: Sim) -> None:
    holder = sim.holder_gateway()
    for model in PREWARM_MODELS:
        sim.other_waiters.append((sim.now(), holder.name if holder else "-", model))
