"""What can go wrong in the simulated cloud, and how long things take when nothing does."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Durations:
    """Virtual seconds of the world's operations when nothing goes wrong (uniform ranges)."""

    capacity_check: tuple[float, float] = (0.5, 4.0)  # trying regions before a CapacityError
    provision: tuple[float, float] = (2.0, 20.0)
    load: tuple[float, float] = (5.0, 30.0)
    swap_cancel: tuple[float, float] = (0.5, 3.0)
    swap_exec: tuple[float, float] = (1.0, 5.0)
    stop: tuple[float, float] = (1.0, 10.0)
    heartbeat: tuple[float, float] = (0.1, 1.0)
    probe: tuple[float, float] = (0.05, 0.3)
    list: tuple[float, float] = (0.1, 0.5)
    hang: tuple[float, float] = (3600.0, 3 * 3600.0)  # a "long" hang

    @property
    def stop_max(self) -> float:
        return self.stop[1]


@dataclass(frozen=True)
class FaultProfile:
    """Per-call fault probabilities of one seed."""

    capacity: float = 0.0  # a spurious CapacityError although GPUs are free
    launch_fail: float = 0.0
    launch_hang: float = 0.0
    load_fail: float = 0.0  # the engine exits while loading (EngineExited)
    load_hang: float = 0.0  # the engine never becomes healthy
    swap_capacity: float = 0.0
    swap_fail_before: float = 0.0  # nothing changed on the cluster
    swap_fail_after: float = 0.0  # the old engine is gone, the new one did not start
    swap_hang: float = 0.0
    stop_fail: float = 0.0
    stop_hang: float = 0.0
    heartbeat_fail: float = 0.0
    heartbeat_hang: float = 0.0
    probe_false: float = 0.0  # says unhealthy although the engine is fine
    list_fail: float = 0.0
    hang_forever: float = 0.5  # share of hangs that last until cancelled (else for hours)

    @classmethod
    def draw(cls, rng: random.Random) -> FaultProfile:
        """A profile for one seed: calm, bumpy or wild, each fault switched on or off."""
        level = rng.choice((0.0, 0.02, 0.05, 0.12))

        def p(weight: float = 1.0) -> float:
            return level * weight if rng.random() < 0.6 else 0.0

        return cls(
            capacity=p(),
            launch_fail=p(),
            launch_hang=p(0.5),
            load_fail=p(),
            load_hang=p(0.5),
            swap_capacity=p(),
            swap_fail_before=p(),
            swap_fail_after=p(),
            swap_hang=p(0.5),
            stop_fail=p(),
            stop_hang=p(0.5),
            heartbeat_fail=p(2),
            heartbeat_hang=p(0.5),
            probe_false=p(),
            list_fail=p(3),
            hang_forever=rng.choice((0.0, 0.5, 1.0)),
        )

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        return tuple(f.name.replace("_", "-") for f in fields(cls) if f.name != "hang_forever")

    def only(self, kinds: frozenset[str], level: float = 0.08) -> FaultProfile:
        """This profile with every fault but `kinds` off (and those on, at `level` if they were off)."""
        changes = {
            f.name: (getattr(self, f.name) or level) if f.name.replace("_", "-") in kinds else 0.0
            for f in fields(self)
            if f.name != "hang_forever"
        }
        return replace(self, **changes)
