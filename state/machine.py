"""The deployment state machine: states, and which transitions are allowed."""

from __future__ import annotations

from enum import StrEnum


class DeploymentState(StrEnum):
    PENDING = "pending"  # recorded, nothing started yet
    LAUNCHING = "launching"  # provider is starting the engine / cluster
    LOADING = "loading"  # engine process runs, weights loading, /health not yet 200
    READY = "ready"  # serving traffic
    DRAINING = "draining"  # no new requests routed; in-flight ones finish
    # Keep-hot time over: the cluster is kept up (engine unused) for `spare_seconds`, for a cold
    # start of any model that fits it to swap onto instead of launching; then it is stopped.
    SPARE = "spare"
    STOPPING = "stopping"  # provider is tearing the engine down
    STOPPED = "stopped"
    FAILED = "failed"


S = DeploymentState

ALLOWED: dict[DeploymentState, frozenset[DeploymentState]] = {
    S.PENDING: frozenset({S.LAUNCHING, S.STOPPING, S.FAILED}),
    S.LAUNCHING: frozenset({S.LOADING, S.STOPPING, S.FAILED}),
    S.LOADING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.DRAINING, S.SPARE, S.STOPPING, S.FAILED}),
    S.DRAINING: frozenset({S.STOPPING, S.FAILED}),
    S.SPARE: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}

TERMINAL: frozenset[DeploymentState] = frozenset(s for s, nxt in ALLOWED.items() if not nxt)

# The column that records when a deployment entered each state.
TIMESTAMP_COLUMN: dict[DeploymentState, str] = {s: f"{s.value}_at" for s in DeploymentState}


class InvalidTransition(ValueError):
    def __init__(self, current: DeploymentState, new: DeploymentState) -> None:
        super().__init__(f"transition {current} -> {new} is not allowed")
        self.current = current
        self.new = new


def check_transition(current: DeploymentState, new: DeploymentState) -> None:
    if new not in ALLOWED[current]:
        raise InvalidTransition(current, new)
