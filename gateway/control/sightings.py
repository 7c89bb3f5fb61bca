"""What a runner knows of whether its cluster still runs: when a heartbeat finds it gone, until
when its GPUs are billed.

A cluster found gone went some time after it was last seen running (a heartbeat answered, or a
probe found its engine healthy) and no later than now. Had the heartbeats after that sighting
been answered on time, the first one due after it would have found the cluster gone: it is
billed up to then, so a heartbeat sent late (a stalled or busy gateway) bills no more. A
heartbeat that got no answer (the provider's API down) looked at nothing, though: the cluster
may have run on until its failsafe deleted it, 3 heartbeat intervals after the last heartbeat
that re-armed it, and that GPU time was spent. Then it is billed up to the failsafe (or up to
its last sighting, if later: a heartbeat that timed out may have re-armed it all the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

# The failsafe deletes a cluster this many heartbeat intervals after its last re-arm (the
# providers' heartbeat interval is a third of their failsafe timer).
FAILSAFE_INTERVALS = 3


@dataclass
class Sightings:
    seen: datetime | None = None  # the last time the cluster was known to run
    armed: datetime | None = None  # the last time its failsafe was (re-)armed: launch, heartbeat
    blind: bool = False  # a heartbeat since `seen` got no answer

    def armed_at(self, at: datetime) -> None:
        """A launch returned, or a heartbeat was answered: it runs, its failsafe re-armed."""
        self.seen = self.armed = at
        self.blind = False

    def healthy_at(self, at: datetime) -> None:
        """A probe found its engine answering (the failsafe is not re-armed by that)."""
        self.seen = at
        self.blind = False

    def unanswered(self) -> None:
        """A heartbeat failed without saying whether the cluster is there."""
        self.blind = True

    def gone_by(self, now: datetime, interval_seconds: float | None) -> datetime:
        """Until when a cluster found gone `now` is billed."""
        if interval_seconds is None or self.seen is None:
            return now
        interval = timedelta(seconds=interval_seconds)
        if not self.blind:
            return min(now, self.seen + interval)
        if self.armed is None:  # adopted, never re-armed here: its failsafe time is not known
            return now
        return min(now, max(self.seen, self.armed + FAILSAFE_INTERVALS * interval))
