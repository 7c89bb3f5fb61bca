"""The Provider protocol: how the controller starts, probes and stops engines.

Value objects are plain frozen dataclasses; a provider's handle on a running engine is a
`ClusterRef` whose `data` is JSON-serialisable so the controller can store it and a later
gateway process can stop or adopt the engine after a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class ProviderError(RuntimeError):
    """An engine could not be started, probed or stopped."""


class CapacityError(ProviderError):
    """No GPUs to be had right now (cloud capacity, or every local slot is taken)."""

    def __init__(self, message: str, *, tried: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tried = tried  # regions / zones / pools that were tried


class EngineExited(ProviderError):
    """The engine process ended while the gateway waited for it."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a provider needs to start one engine for one model."""

    deployment_id: str
    model: str  # the model id clients use; also the engine's served model name
    gpus: int = 1
    priority: int = 0
    model_path: str | None = None  # local weights; else the engine downloads `model`
    accelerators: tuple[str, ...] = ()
    engine_args: tuple[str, ...] = ()
    max_model_len: int | None = None
    kind: str = "chat"
    # Secrets handed to the engine's environment (e.g. HF_TOKEN). Never stored nor logged.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The engine's own API key (derived by the gateway from its secret and the deployment id):
    # every route but /health must require it. A secret.
    engine_key: str = field(default="", repr=False)
    instance_id: str = ""  # this installation's id: the label that scopes list() and reconcile


@dataclass(frozen=True)
class ClusterRef:
    """A provider's handle on a started engine."""

    provider: str
    name: str  # cluster name (SkyPilot) or engine name (local)
    deployment_id: str
    gpus: int = 1
    data: Mapping[str, Any] = field(default_factory=dict)  # provider-specific, JSON-serialisable


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:41234 — the gateway appends /v1/...


@dataclass(frozen=True)
class ClusterInfo:
    ref: ClusterRef
    status: str  # provider's word for it: running, exited, INIT, UP, ...
    model: str | None = None


@runtime_checkable
class Provider(Protocol):
    name: str
    # Take back a healthy engine found after a gateway restart (else it is stopped).
    adopt_on_restart: bool

    @property
    def heartbeat_interval_seconds(self) -> float | None:
        """How often `heartbeat` must be called for engines the gateway holds; None: never."""
        ...

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        """Start an engine; returns once it is started, not once it is ready."""
        ...

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        """Return once the engine's /health answers 200. Callers bound it with a timeout."""
        ...

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        """Replace the engine running on `ref`'s GPUs with one for `spec`."""
        ...

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        """The engine's endpoint if it is healthy right now, else None (for reconcile)."""
        ...

    async def heartbeat(self, ref: ClusterRef) -> None:
        """Tell the engine's infrastructure the gateway still holds it (failsafe timers)."""
        ...

    async def stop(self, ref: ClusterRef) -> None:
        """Tear the engine down; idempotent (stopping a gone engine is not an error)."""
        ...

    async def list(self) -> list[ClusterInfo]:
        """Engines this provider knows about (for reconcile and the admin view)."""
        ...
