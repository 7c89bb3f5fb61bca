"""The Provider protocol: how the controller starts, probes and stops engines.

Value objects are plain frozen dataclasses; a provider's handle on a running engine is a
`ClusterRef` whose `data` is JSON-serialisable so the controller can store it and a later
gateway process can stop or adopt the engine after a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

# What a deployment left LOADING by an earlier gateway process is now (see probe_loading).
LoadingState = Literal["ready", "loading", "dead"]


class ProviderError(RuntimeError):
    """An engine could not be started, probed or stopped.

    The message is short and safe to show a client (it names the deployment); `log_tail` holds
    the last lines of the engine's log when there are any, for admins only (paths, arguments
    and stack traces must not reach clients)."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class CapacityError(ProviderError):
    """No GPUs to be had right now (cloud capacity, or every local slot is taken)."""

    def __init__(self, message: str, *, tried: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tried = tried  # regions / zones / pools that were tried


class EngineExited(ProviderError):
    """The engine process ended while the gateway waited for it (its log tail in `log_tail`)."""


class EngineGone(ProviderError):
    """The engine's infrastructure no longer exists (a preempted or deleted cluster): the
    deployment is dead, not merely unreachable."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a provider needs to start one engine for one model."""

    deployment_id: str
    model: str  # the model id clients use; also the engine's served model name
    gpus: int = 1
    priority: int = 0
    model_path: str | None = None  # local weights; else the engine downloads `model`
    # The model's files in a weight store (s3://bucket/prefix, gs://...): streamed by vLLM's Run:ai
    # streamer (`--load-format runai_streamer`) instead of a download from Hugging Face.
    weights_uri: str | None = None
    accelerators: tuple[str, ...] = ()
    engine_args: tuple[str, ...] = ()
    max_model_len: int | None = None
    kind: str = "chat"
    # Secrets handed to the engine's environment (e.g. HF_TOKEN). Never stored nor logged.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The bearer key the engine's front accepts (HMAC-SHA256(gateway secret, deployment id), hex):
    # a secret, never stored nor logged. Providers refuse to start an engine without one.
    engine_key: str = field(default="", repr=False)
    # This installation's id (kept in the store): every engine carries it, and providers list
    # and stop only this installation's engines.
    instance_id: str = ""


# vLLM flags that read the weights with the Run:ai streamer (from a weight store: s3://, gs://).
STREAMER_ARGS = ("--load-format", "runai_streamer")


def engine_args(spec: LaunchSpec) -> tuple[str, ...]:
    """The model's engine flags, with the streamer's when its weights come from a store."""
    if spec.weights_uri and "--load-format" not in spec.engine_args:
        return (*spec.engine_args, *STREAMER_ARGS)
    return spec.engine_args


def weights(spec: LaunchSpec) -> str:
    """What the engine loads: the store's copy, else local files, else the Hugging Face id."""
    return spec.weights_uri or spec.model_path or spec.model


@dataclass(frozen=True)
class ClusterRef:
    """A provider's handle on a started engine.

    `engine_key` is in memory only: it is not part of what the gateway stores (`data` and the
    named fields are); a ref rebuilt from the store gets it again from the gateway, which derives
    it from the deployment id (`dataclasses.replace(ref, engine_key=...)`)."""

    provider: str
    name: str  # cluster name (SkyPilot) or engine name (local)
    deployment_id: str
    gpus: int = 1
    data: Mapping[str, Any] = field(default_factory=dict)  # provider-specific, JSON-serialisable
    engine_key: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class Endpoint:
    """Where the gateway reaches an engine: its authenticating front. Every request but
    `/health` must carry `Authorization: Bearer <engine_key>`."""

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
    # Keep a cluster up as a spare after its keep-hot time, for a cold start to `swap` onto: where
    # a swap saves the provisioning (clouds), not where it saves nothing (local GPU slots).
    keeps_spares: bool

    @property
    def heartbeat_interval_seconds(self) -> float | None:
        """How often `heartbeat` must be called for engines the gateway holds; None: never."""
        ...

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        """Start an engine; returns once it is started, not once it is ready."""
        ...

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        """Return once the engine's /health answers 200 and its /v1/models names the model
        (`ref.engine_key` is needed for that). Callers bound it with a timeout."""
        ...

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        """Replace the engine running on `ref`'s GPUs with one for `spec`."""
        ...

    def fits(self, ref: ClusterRef, spec: LaunchSpec) -> bool:
        """Whether `swap(ref, spec)` can run `spec` on `ref`'s cluster: its GPU type is one the
        model allows and it has enough of them. Pure (no call)."""
        ...

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        """The engine's endpoint if it is healthy right now, else None (for reconcile)."""
        ...

    async def probe_loading(self, ref: ClusterRef) -> LoadingState:
        """For reconcile of a deployment left LOADING: `ready` (healthy now), `loading` (the
        engine still starts: resume `wait_ready`) or `dead` (stop it)."""
        ...

    async def check_failsafe(self, instance_id: str | None = None) -> list[str]:
        """At startup: check that engines left behind by a dead gateway end by themselves (the
        SkyPilot autodown) and re-arm it where it is off. Returns what was found and done, one
        line each (for events); raises ProviderError when the failsafe cannot work."""
        ...

    async def close(self) -> None:
        """Release the provider's own resources (thread pools); engines keep running."""
        ...

    async def heartbeat(self, ref: ClusterRef) -> None:
        """Tell the engine's infrastructure the gateway still holds it (failsafe timers).
        Raises `EngineGone` when the engine no longer exists."""
        ...

    async def stop(self, ref: ClusterRef) -> None:
        """Tear the engine down; idempotent (stopping a gone engine is not an error)."""
        ...

    async def list(self, instance_id: str | None = None) -> list[ClusterInfo]:
        """This installation's engines (for reconcile, shutdown and the admin view). Providers
        whose engines outlive the gateway need `instance_id` and raise ProviderError without
        it: they never list another installation's engines."""
        ...
