"""One runner per deployment: the single owner of a deployment's lifecycle.

A `DeploymentRunner` is one task that takes a deployment from `pending` to a terminal state:
launch (or swap onto a spare cluster, or take over a lower-priority model's cluster), wait until
ready, serve, wait for a stop request, drain, stop. After an idle stop, where the provider keeps
spares and `spare_seconds` is set, the runner first keeps its cluster as a spare (state `spare`):
it waits the same way, for a cold start that fits to ask for the cluster (a hand-over, as in a
takeover) or for a stop request (the spare's time is over, after hours, shutdown).

Cleanup is in one `finally` (`_release`), so every exit — success, failure, cold-start timeout,
a stop request during the start, takeover, unload, after hours, shutdown, a spare's expiry —
ends `stopped` or `failed` with `provider.stop` done, or with the cluster handed to the runner of
another deployment (takeover, spare swap). Others never change a deployment themselves: they *ask* its
runner (`request_stop`, `hand_over`, `check_engine`) and await its task.

A stop that fails is retried with back-off, the deployment staying `stopping` (so `failed` and
`stopped` always mean the engine is gone). A runner whose process lost the controller lease is
abandoned: it stops at once and causes no side effect, leaving the engine to the new holder.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from gateway.api.errors import GatewayError, bad_gateway, unavailable
from gateway.config.reference import ModelSpec
from gateway.control.context import ControlContext
from gateway.control.fleet import Route, ref_json
from gateway.control.sightings import Sightings
from state import ALLOWED, DeploymentState
from tasks.provider import CapacityError, ClusterRef, Endpoint, EngineGone, LaunchSpec, ProviderError

log = logging.getLogger(__name__)
S = DeploymentState

# Seconds a client is told to wait before retrying after a 503.
RETRY_AFTER_CAPACITY = 30
RETRY_AFTER_COLD_START = 30
RETRY_AFTER_CANCELLED = 10
# A failed stop is retried after 2, 4, 8 … seconds, at most this long apart.
STOP_RETRY_MAX_SECONDS = 60.0
# While the gateway shuts down, a stop that keeps failing is given up after this many tries; the
# deployment stays `stopping` in the store and the next start's reconcile tries again.
STOP_TRIES_AT_SHUTDOWN = 2

_STARTING = frozenset({S.PENDING, S.LAUNCHING, S.LOADING})


@dataclass(frozen=True)
class StopRequest:
    kind: str  # the event kind: idle-stop, admin-unload, after-hours-stop, shutdown-stop, …
    reason: str
    drain: bool = True  # requests in flight get drain_seconds
    failed: bool = False  # the deployment ends `failed` (its engine died)
    spare: bool = False  # an idle stop: the cluster may stay up as a spare first


@dataclass(frozen=True)
class Adoption:
    """An engine an earlier gateway process started: serve it (endpoint known) or wait for it."""

    ref: ClusterRef
    state: DeploymentState
    endpoint: Endpoint | None = None


class RunnerOwner(Protocol):
    """What a runner needs from the controller that created it."""

    @property
    def closing(self) -> bool: ...

    async def take_over(self, runner: DeploymentRunner, exc: CapacityError) -> ClusterRef: ...

    async def claim_spare(self, runner: DeploymentRunner) -> ClusterRef | None: ...

    def remember_failure(self, runner: DeploymentRunner, error: str) -> None: ...

    def runner_done(self, runner: DeploymentRunner) -> None: ...

    def heartbeat_slot(self) -> asyncio.Semaphore: ...


class _Exit(Exception):
    """Why a runner's start ended early: what admins are told (`error`) and what waiting clients
    get (`client`). `failed=False` is a stop request that cut the start short."""

    def __init__(
        self, *, error: str, client: GatewayError, failed: bool = True, remember: bool = False
    ) -> None:
        super().__init__(error)
        self.error = error
        self.client = client
        self.failed = failed
        self.remember = remember
        self.discard = False  # nothing was ever held: the deployment costs nothing


@dataclass
class _HandOver:
    requester: DeploymentRunner
    future: asyncio.Future[ClusterRef]


class DeploymentRunner:
    task: asyncio.Task[None]  # the one task that drives the deployment

    def __init__(
        self,
        ctx: ControlContext,
        owner: RunnerOwner,
        spec: ModelSpec,
        *,
        deployment_id: str,
        launch_spec: LaunchSpec,
        adoption: Adoption | None = None,
        previous: Sequence[DeploymentRunner] = (),
        request_secrets: bool = False,
        started_by: str | None = None,
        why: str = "cold start requested",
    ) -> None:
        self.ctx = ctx
        self.owner = owner
        self.spec = spec
        self.id = deployment_id
        self.launch_spec = launch_spec
        self.state = adoption.state if adoption else S.PENDING
        self.ref: ClusterRef | None = adoption.ref if adoption else None
        self.endpoint: Endpoint | None = None
        self.started_at = ctx.clock()
        self.ready_at: datetime | None = None
        self.spare_at: datetime | None = None  # when it became a spare
        self.stop_request: StopRequest | None = None
        self.handed_over_to: str | None = None
        self.fenced = False
        self.done = False
        self.ready: asyncio.Future[Route] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(_retrieve)
        # Started with a client's own Hugging Face token: its failure says nothing about everyone
        # else's requests, so it is not remembered against them.
        self.request_secrets = request_secrets
        # Whose start this is (the request's API key id, `admin`): in the row, for cost by key.
        self.started_by = started_by
        self._why = why  # the launch event's reason: a cold start, or a replica for more load
        self._adoption = adoption
        self._previous = [r for r in previous if not r.task.done()]
        self._waiting_previous = False
        # Set once it holds nothing a later start of its model must wait for: it ended, or it is a
        # spare (a cluster of its own, which that start may even swap onto).
        self.let_go = asyncio.Event()
        self._rests = asyncio.Event()  # a spare with no stop asked for (see stopped_or_spare)
        self._wake = asyncio.Event()
        self._handover: _HandOver | None = None
        self._op: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[None]] = set()
        self._checking = False
        self._beating = False
        self._created = adoption is not None  # the row exists (a new one is written by run())
        self._moving: asyncio.Future[None] | None = None  # a state change sent to the writer
        self._moved_at: dict[DeploymentState, datetime] = {}
        self.last_beat: datetime | None = None  # the failsafe's last re-arm; None: due at once
        # Billed up to here at most: its cluster vanished (preempted, deleted) by then.
        self._gone_by: datetime | None = None
        self._sightings = Sightings()  # when its cluster was last known to run (bounds _gone_by)
        # Whether it ever held GPUs: a launch sent (it may have made a cluster), or a cluster held.
        self._launch_sent = self._held = adoption is not None
        self._billed_out = False  # its cost interval closed when its engine stopped
        if adoption is not None and adoption.endpoint is not None:
            self._adopted_ready(adoption.endpoint)  # serves from this moment, not from the task's first step
        self.task = asyncio.create_task(self.run(), name=f"deployment {deployment_id} ({spec.id})")
        self.task.add_done_callback(lambda _: self.let_go.set())

    # -- what others may ask ----------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.spec.id

    @property
    def deployment_id(self) -> str:
        return self.id

    @property
    def serving(self) -> bool:
        """Ready and taking new requests (no stop or handover asked for)."""
        return (
            self.state is S.READY
            and self.stop_request is None
            and self._handover is None
            and not self.done
            and self.endpoint is not None
        )

    @property
    def starting(self) -> bool:
        """Coming up, and new requests may wait for it."""
        return self.state in _STARTING and self.stop_request is None and not self.done

    @property
    def claimable(self) -> bool:
        """A spare no one has asked for yet, and not asked to stop."""
        return (
            self.state is S.SPARE
            and self.stop_request is None
            and self._handover is None
            and not self.done
            and self.ref is not None
            and self.spare_at is not None
        )

    @property
    def spare_seconds(self) -> float:
        """How long it stays up as a spare after an idle stop (the model's value, else the setting's)."""
        spec = self.ctx.catalog.resolve(self.model) or self.spec
        return spec.spare_seconds if spec.spare_seconds is not None else self.ctx.settings.spare_seconds

    def route(self) -> Route:
        assert self.endpoint is not None
        return Route(
            model=self.model,
            base_url=self.endpoint.base_url,
            deployment_id=self.id,
            api_key=self.engine_key,
        )

    @functools.cached_property
    def engine_key(self) -> str:
        """Derived once (an HMAC per request was 1% of the gateway's CPU at 32 connections)."""
        return self.ctx.engine_key(self.id)

    def request_stop(self, request: StopRequest) -> bool:
        """Ask the runner to stop (the first request wins); a start in progress is cut short.
        It stops taking new requests at once."""
        if self.stop_request is not None or self.done:
            return False
        self.stop_request = request
        self._rests.clear()
        if request.kind not in ("evicted", "engine-failed"):  # those write their own events
            self._event(request.kind, request.reason)  # when decided, not when done
        if self._op is not None and not self._op.done():
            self._op.cancel()
        self._wake.set()
        return True

    def hand_over(self, requester: DeploymentRunner) -> asyncio.Future[ClusterRef]:
        """Ask a serving runner to drain and give its cluster to `requester` (a takeover), or a
        spare to give its cluster at once."""
        future: asyncio.Future[ClusterRef] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._handover = _HandOver(requester, future)
        self._wake.set()
        return future

    async def receive_cluster(self, ref: ClusterRef) -> None:
        """Called by a victim, synchronously, as it hands over: from now on this runner owns
        `ref`, and its `finally` stops it if the deployment never becomes ready. The store says
        so at once, so a gateway that dies here leaves the cluster to this deployment's row.
        The store first: if it cannot be written, or this runner ended meanwhile, this raises and
        the victim keeps the cluster (and stops it)."""
        await self.ctx.writer.run(
            self.ctx.store.update_deployment, self.id, cluster=ref.name, handle=ref_json(ref)
        )
        if self.done:
            raise ProviderError(f"deployment {self.id} ended before it received {ref.name}")
        self.ref = ref

    def check_engine(self, reason: str) -> None:
        """The proxy could not talk to the engine: probe it, and stop as failed if it is gone."""
        if self.serving and not self._checking:
            self._checking = True
            self._spawn(self._check(reason))

    async def stopped_or_spare(self) -> None:
        """Until the runner has ended, or rests as a spare (for `Controller.settle`)."""
        rests = asyncio.ensure_future(self._rests.wait())
        try:
            await asyncio.wait({self.task, rests}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            rests.cancel()

    def abandon(self) -> None:
        """This process lost the controller lease: stop at once, touching nothing."""
        self.fenced = True
        self.task.cancel()

    # -- the lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        exit_: _Exit | None = None
        try:
            await self._create()
            await self._start()
            await self._serve()
        except _Exit as exc:
            exit_ = exc
        except Exception as exc:  # a store error or a bug: the deployment must still end
            log.exception("deployment %s of %s: runner error", self.id, self.model)
            exit_ = _Exit(
                error=f"internal error: {type(exc).__name__}: {exc}",
                client=bad_gateway(
                    f"The engine for {self.model} failed (deployment {self.id}).", code="engine_start_failed"
                ),
            )
        finally:
            await self._release(exit_)

    async def _create(self) -> None:
        """The deployment's row (pending), written before anything else of it."""
        if self._created:
            return
        gpus, priority = self.spec.gpus_per_replica, self.spec.priority
        try:
            await self.ctx.writer.run(
                self.ctx.store.create_deployment,
                deployment_id=self.id,
                model=self.model,
                provider=self.ctx.provider.name,
                gpus=gpus,
                at=self.started_at,
                started_by=self.started_by,
            )
        except Exception as exc:
            raise self._start_failed(exc) from exc
        self._created = True
        self._event("launch", f"{self._why} ({gpus} GPU, priority {priority})")

    async def _start(self) -> None:
        if self.stop_request is not None:  # asked to stop before it began (reconcile)
            raise self._cut_short()
        if self.endpoint is not None:  # adopted healthy: ready already
            return
        op = self._op = asyncio.create_task(self._bring_up(), name=f"start {self.id}")
        timeout = self.ctx.cold_start_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({op})
        except TimeoutError:
            op.cancel()
            await asyncio.wait({op})
            raise self._timed_out(timeout) from None
        finally:
            if not op.done():  # the runner itself was cancelled (abandoned)
                op.cancel()
        if op.cancelled():  # a stop request cut the start short
            raise self._cut_short()
        op.result()  # re-raises the _Exit of a failed start

    async def _bring_up(self) -> None:
        await self._wait_previous()
        try:
            if self._adoption is None:
                self.hold(None)  # priced from the settings until the provider says more
                await self._move(S.LAUNCHING)
                self.ref = await self._launch()
                self.last_beat = self.ctx.clock()  # the launch armed the failsafe
                self._sightings.armed_at(self.last_beat)
                self.hold(self.ref)
                ref = self.ref
                if self.ctx.acting():  # else the row is the new lease holder's: its sweep finds ref
                    self.ctx.writer.submit(
                        self.ctx.store.update_deployment, self.id, cluster=ref.name, handle=ref_json(ref)
                    )
                await self._move(S.LOADING)
            assert self.ref is not None
            endpoint = await self.ctx.provider.wait_ready(self.ref)
        except CapacityError as exc:
            raise self._no_capacity(exc) from exc
        except Exception as exc:  # ProviderError, or anything a provider let through
            raise self._start_failed(exc) from exc
        await self._became_ready(endpoint)

    async def _launch(self) -> ClusterRef:
        ref = await self.owner.claim_spare(self)
        if ref is not None:
            return ref
        self._launch_sent = True
        try:
            return await self.ctx.provider.launch(self.launch_spec)
        except CapacityError as exc:
            self._launch_sent = False  # it launched nothing: what it waits for is a victim's
            return await self.owner.take_over(self, exc)

    async def _wait_previous(self) -> None:
        """The model's previous engines must release their GPUs first (under the cold-start
        timeout, like the rest of the start)."""
        pending = [r.let_go for r in self._previous if not r.let_go.is_set()]
        if pending:
            self._waiting_previous = True
            await asyncio.gather(*(event.wait() for event in pending))
            self._waiting_previous = False

    async def _became_ready(self, endpoint: Endpoint) -> None:
        for step in (S.LAUNCHING, S.LOADING):  # an adopted one walks up from where it was
            if step in ALLOWED[self.state]:
                await self._move(step)
        if self.state is not S.READY:
            await self._move(S.READY, endpoint=endpoint.base_url)
        self._serve_from(endpoint)

    def _adopted_ready(self, endpoint: Endpoint) -> None:
        """An adopted healthy engine (at startup, from the constructor): its row is moved to
        ready at once, so that it serves before its task's first step."""
        for step in (S.LAUNCHING, S.LOADING, S.READY):
            if step in ALLOWED[self.state]:
                at = self.ctx.clock()
                fields = {"endpoint": endpoint.base_url} if step is S.READY else {}
                moved = self.ctx.store.transition(self.id, expected=self.state, new=step, at=at, **fields)
                self._moved(step, at, moved)
        self._serve_from(endpoint)

    def _serve_from(self, endpoint: Endpoint) -> None:
        now = self.ctx.clock()
        self.endpoint = endpoint
        self.ready_at = now
        self._observe_cold_start()
        self.ctx.activity.touch(self.model, now)
        elapsed = (now - self.started_at).total_seconds()
        self._event("ready", f"ready at {endpoint.base_url} after {elapsed:.1f}s")
        self.ready.set_result(self.route())

    async def _serve(self) -> None:
        """Serve until a stop is requested or the cluster is handed over; then drain. An idle
        stop may make it a spare first, which waits the same way."""
        while True:
            while self.stop_request is None:
                await self._wake.wait()
                self._wake.clear()
                if self._handover is not None and await self._give_away(self._handover):
                    return
            if not await self._keep_as_spare():
                break
        request = self.stop_request
        assert request is not None
        if request.drain and self.state is S.READY and self.ctx.activity.in_flight_of(self.id) > 0:
            await self._move(S.DRAINING)
            await self.ctx.activity.wait_idle(self.id, self.ctx.settings.drain_seconds)

    async def _keep_as_spare(self) -> bool:
        """After an idle stop, keep the cluster up as a spare (engine left as it is: the swap of
        whoever claims it replaces it); True if it became one."""
        request, seconds = self.stop_request, self.spare_seconds
        if request is None or not request.spare or self.state is not S.READY or seconds <= 0:
            return False
        if not self.ctx.provider.keeps_spares or self.owner.closing or self.ref is None:
            return False
        try:
            await self._move(S.SPARE)
        except Exception as exc:  # a store error: stopped as it would have been without spares
            log.warning("deployment %s of %s: cannot become a spare: %s", self.id, self.model, exc)
            return False
        self.spare_at = self.ctx.clock()
        self.stop_request = None
        self.let_go.set()
        self._rests.set()
        self._event(
            "spare", f"{self.ref.name} kept as a spare for {seconds:g}s for a cold start that fits it"
        )
        return True

    async def _give_away(self, handover: _HandOver) -> bool:
        """Drain, then hand the cluster to the requester if it still wants it; True if handed.
        A spare hands it at once, and stays a spare if the requester has gone."""
        requester = handover.requester
        if self.state is S.SPARE:
            return await self._give_spare(handover)
        await self._move(S.DRAINING)
        self._event("evicted", f"evicted by {requester.model} (priority {requester.spec.priority})")
        await self.ctx.activity.wait_idle(self.id, self.ctx.settings.drain_seconds)
        if handover.future.done() or requester.done or requester.stop_request is not None:
            self.stop_request = StopRequest(
                "evicted", f"{requester.model} no longer needs the cluster", drain=False
            )
            return False
        return await self._hand(handover)

    async def _give_spare(self, handover: _HandOver) -> bool:
        requester = handover.requester
        if handover.future.done() or requester.done or requester.stop_request is not None:
            self._handover = None  # still a spare, for the next cold start
            if not handover.future.done():
                handover.future.set_exception(CapacityError(f"{requester.model} no longer needs a spare"))
            return False
        self._event("spare-claimed", f"claimed by {requester.model} (deployment {requester.id})")
        return await self._hand(handover)

    async def _hand(self, handover: _HandOver) -> bool:
        """The hand-over itself: the requester's row names the cluster first, then it owns it.
        False if that cannot be written or the requester ended meanwhile: this runner keeps the
        cluster and stops it."""
        assert self.ref is not None
        requester = handover.requester
        self._cancel_children()
        try:
            await requester.receive_cluster(self.ref)
        except Exception as exc:
            self.stop_request = StopRequest(
                "evicted", f"handover to {requester.model} failed: {exc}", drain=False
            )
            if not handover.future.done():
                handover.future.set_exception(CapacityError(f"hand-over to {requester.model} failed"))
            return False
        self.handed_over_to = requester.model
        handover.future.set_result(self.ref)
        return True

    async def _release(self, exit_: _Exit | None) -> None:
        """The one way out: waiters answered, engine stopped (or handed over), state terminal,
        ledger closed, event written, runner forgotten."""
        self.done = True
        self._cancel_children()
        remember = exit_ is not None and exit_.remember and not self.fenced
        if remember and exit_ is not None:  # before the waiters hear of it: they may ask why
            self.owner.remember_failure(self, exit_.error)
        if not self.ready.done():
            self.ready.set_exception(exit_.client if exit_ else self._cut_short().client)
        if self._handover is not None and not self._handover.future.done():
            self._handover.future.set_exception(CapacityError(f"{self.model} stopped before handing over"))
        if self._moving is not None and not self._moving.done():
            await asyncio.wait({self._moving})  # sent before a cancellation: it lands first
        try:
            if not self._created:
                log.warning("deployment %s of %s: never written (%s)", self.id, self.model, exit_)
            elif self.fenced:
                log.warning("deployment %s of %s: left to the next lease holder", self.id, self.model)
            elif self.handed_over_to is not None:
                await self._record(S.STOPPING)
                await self._record(S.STOPPED)
                self._event("handed-over", f"cluster handed over to {self.handed_over_to}")
            else:
                await self._stop_and_close(exit_)
        finally:
            self.owner.runner_done(self)

    async def _stop_and_close(self, exit_: _Exit | None) -> None:
        if self.stop_request is not None and self.stop_request.kind == "engine-failed":
            self._event(self.stop_request.kind, self.stop_request.reason)
        if exit_ is not None and exit_.failed:
            log.warning("deployment %s of %s: %s", self.id, self.model, exit_.error.splitlines()[0])
            self._event("launch-failed", exit_.error)
        if self.state is not S.STOPPING and not await self._record(S.STOPPING):
            return  # the store cannot be written: left as it is for the next start's reconcile
        if self.ref is not None and not await self._stop_engine():
            return  # left `stopping`: the next start's reconcile stops it
        failed = exit_.error if exit_ is not None and exit_.failed else None
        if failed is None and self.stop_request is not None and self.stop_request.failed:
            failed = self.stop_request.reason
        # Its GPUs are billed until the engine stopped (or its cluster vanished), from now on,
        # not from when the store can record the end (database errors retried for a while).
        until = self.ctx.clock() if self._gone_by is None else min(self.ctx.clock(), self._gone_by)
        self.ctx.ledger.state(self.id, self.model, S.STOPPED if failed is None else S.FAILED, until)
        self._billed_out = True
        if failed is not None:
            await self._record(S.FAILED, error=failed[:4000])
        else:
            await self._record(S.STOPPED)
        if exit_ is not None and (exit_.discard or not (self._launch_sent or self._held)):
            # Nothing was ever held (no capacity; or cut short or timed out while it waited
            # for a takeover's victim, which bills its own cluster): it costs nothing.
            self.ctx.ledger.discard(self.id)

    async def _stop_engine(self) -> bool:
        """provider.stop, retried until it succeeds; False if given up (shutdown, lease lost)."""
        assert self.ref is not None
        tries = 0
        while True:
            try:
                async with asyncio.timeout(self.ctx.settings.stop_timeout_seconds):
                    await self.ctx.provider.stop(self.ref)
                return True
            except Exception as exc:  # ProviderError, a timeout, or the lease is gone
                tries += 1
                log.warning("deployment %s of %s: stop failed (try %d): %s", self.id, self.model, tries, exc)
                if tries == 1:
                    self._event("stop-failed", f"{type(exc).__name__}: {exc}; retrying")
                # Refused by the fence (the lease not renewed yet after a stall) is retried too:
                # the lease comes back, or is lost and the runner abandoned.
                if self.fenced or (self.owner.closing and tries >= STOP_TRIES_AT_SHUTDOWN):
                    return False
                await asyncio.sleep(min(2.0**tries, STOP_RETRY_MAX_SECONDS))

    # -- background work of a runner --------------------------------------------------------

    def heartbeat(self, now: datetime) -> None:
        """Re-arm the cluster's failsafe in the background: bounded in time, at most a few at
        once across the gateway, and one at a time per runner, so a hung call never holds up
        the control loop or anything else."""
        if self.ref is None or self.done or self._beating:
            return
        self._beating = True
        self._spawn(self._beat(now))

    async def _beat(self, now: datetime) -> None:
        assert self.ref is not None
        try:
            async with self.owner.heartbeat_slot():
                async with asyncio.timeout(self.ctx.settings.provider_call_timeout_seconds):
                    await self.ctx.provider.heartbeat(self.ref)
            self.last_beat = now
            self._sightings.armed_at(self.ctx.clock())
        except EngineGone as exc:  # preempted or deleted: it serves nothing and bills nothing more
            self._gone_by = self._sightings.gone_by(
                self.ctx.clock(), self.ctx.provider.heartbeat_interval_seconds
            )
            self.request_stop(StopRequest("engine-failed", f"engine gone: {exc}", drain=False, failed=True))
        except Exception as exc:
            log.warning("deployment %s of %s: heartbeat failed: %s", self.id, self.model, exc)
            self._sightings.unanswered()
            if self.state is S.READY:  # the provider cannot say (its API is down): ask the engine
                self._checking = True
                await self._check(f"heartbeat failed: {type(exc).__name__}")
        finally:
            self._beating = False

    async def _check(self, reason: str) -> None:
        assert self.ref is not None
        try:
            async with asyncio.timeout(self.ctx.settings.provider_call_timeout_seconds):
                alive = await self.ctx.provider.probe(self.ref) is not None
            if alive:
                self._sightings.healthy_at(self.ctx.clock())
        except Exception:
            alive = False
        finally:
            self._checking = False
        if not alive:
            self.request_stop(
                StopRequest(
                    "engine-failed", f"engine died while serving ({reason})", drain=False, failed=True
                )
            )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._children.add(task)
        task.add_done_callback(self._children.discard)

    def _cancel_children(self) -> None:
        for task in list(self._children):
            if task is not asyncio.current_task():
                task.cancel()

    # -- how a start ended ------------------------------------------------------------------

    def _timed_out(self, timeout: float) -> _Exit:
        if self._waiting_previous:
            return _Exit(
                error=f"the previous engine of {self.model} did not stop within {timeout:g}s",
                client=unavailable(
                    f"{self.model} is still stopping its previous engine; retry later.",
                    code="cold_start_timeout",
                    retry_after=RETRY_AFTER_COLD_START,
                ),
            )
        return _Exit(
            error=f"not ready after {timeout:g}s (cold start timeout)",
            client=unavailable(
                f"{self.model} did not become ready within {timeout:g}s.",
                code="cold_start_timeout",
                retry_after=RETRY_AFTER_COLD_START,
            ),
            remember=True,
        )

    def _cut_short(self) -> _Exit:
        request = self.stop_request
        why = request.reason if request else "the gateway is stopping"
        return _Exit(
            error=f"start cancelled: {why}",
            client=unavailable(
                f"The start of {self.model} was cancelled ({why}); retry later.",
                code="start_cancelled",
                retry_after=RETRY_AFTER_CANCELLED,
            ),
            failed=False,
        )

    def _no_capacity(self, exc: CapacityError) -> _Exit:
        exit_ = _Exit(
            error=f"no capacity: {exc}",
            client=unavailable(
                f"No GPU capacity for {self.model}: {exc}",
                code="capacity_unavailable",
                retry_after=RETRY_AFTER_CAPACITY,
            ),
        )
        exit_.discard = self.ref is None  # no GPUs were ever held
        return exit_

    def _start_failed(self, exc: BaseException) -> _Exit:
        error = str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
        tail = getattr(exc, "log_tail", None)
        if tail:
            error += f"\nlast lines of the engine log:\n{tail}"
        return _Exit(
            error=error,
            client=bad_gateway(
                f"The engine for {self.model} failed to start (deployment {self.id}); "
                "an admin can see why in /admin/failures.",
                code="engine_start_failed",
            ),
            remember=not self.request_secrets,
        )

    # -- store, ledger, events --------------------------------------------------------------

    def hold(self, ref: ClusterRef | None) -> None:
        self._held = self._held or ref is not None
        gpus = ref.gpus if ref is not None else self.spec.gpus_per_replica
        price = self.ctx.ledger.prices.hourly(ref, gpus, self.spec.accelerators or ())
        self.ctx.ledger.held(self.id, cluster=ref.name if ref else None, gpus=gpus, hourly_price=price)

    def rehold(self, ref: ClusterRef) -> None:
        """After a takeover: the cost starts now, on the victim's cluster (before, it held nothing)."""
        self.ctx.ledger.discard(self.id)
        self.hold(ref)
        self.ctx.ledger.state(self.id, self.model, S.LAUNCHING, self.ctx.clock())

    async def _move(self, new: DeploymentState, **fields: Any) -> None:
        """Store (compare-and-swap, on the writer's thread), memory, then ledger (which queues
        its writes: it never fails here). Once sent, a move completes even if the runner is
        cancelled meanwhile: memory must follow the row."""
        old, at = self.state, self.ctx.clock()
        if not self.ctx.acting():  # a lapsed lease (a stall): the new holder owns the row now
            raise ProviderError(f"not the controller lease holder: {self.id} not moved to {new}")
        sent = self.ctx.writer.run(self.ctx.store.transition, self.id, expected=old, new=new, at=at, **fields)
        move = self._moving = asyncio.ensure_future(self._landed(sent, new, at))
        move.add_done_callback(_retrieve)
        await asyncio.shield(move)

    async def _landed(self, sent: Awaitable[bool], new: DeploymentState, at: datetime) -> None:
        self._moved(new, at, await sent)

    def _moved(self, new: DeploymentState, at: datetime, moved: bool) -> None:
        old = self.state
        if not moved:
            raise ProviderError(f"deployment {self.id} is no longer {old}")
        self.state = new
        self._moved_at[new] = at
        log.info("deployment %s of %s: %s -> %s", self.id, self.model, old, new)
        if not (self._billed_out and new in (S.STOPPED, S.FAILED)):  # else closed when it stopped
            self.ctx.ledger.state(self.id, self.model, new, at)

    async def _record(self, new: DeploymentState, **fields: Any) -> bool:
        """`_move` on the way out, retried through database errors: the end of a deployment
        must reach the store. False if given up (lease lost, or the gateway stopping)."""
        tries = 0
        while self.state is not new:
            try:
                await self._move(new, **fields)
            except Exception as exc:
                tries += 1
                log.warning(
                    "deployment %s of %s: cannot record %s (try %d): %s", self.id, self.model, new, tries, exc
                )
                if self.fenced or (self.owner.closing and tries >= STOP_TRIES_AT_SHUTDOWN):
                    return False
                await asyncio.sleep(min(2.0**tries, STOP_RETRY_MAX_SECONDS))
        return True

    def _event(self, kind: str, message: str) -> None:
        """Events say why; one lost to a database error must not change what happens (the
        writer logs it)."""
        try:
            self.ctx.writer.submit(
                self.ctx.store.record_event,
                kind=kind,
                model=self.model,
                deployment_id=self.id,
                message=message,
                at=self.ctx.clock(),
            )
        except Exception as exc:  # the writer is closed (the gateway is stopping)
            log.error("deployment %s of %s: event %s not recorded: %s", self.id, self.model, kind, exc)

    def _observe_cold_start(self) -> None:
        if self._adoption is not None:
            return
        moved = self._moved_at
        launching, loading, ready = moved.get(S.LAUNCHING), moved.get(S.LOADING), moved.get(S.READY)
        if not (launching and loading and ready):
            return
        for phase, seconds in (
            ("launching", (loading - launching).total_seconds()),
            ("loading", (ready - loading).total_seconds()),
            ("total", (ready - self.started_at).total_seconds()),
        ):
            self.ctx.metrics.cold_start.labels(model=self.model, phase=phase).observe(seconds)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A future nobody awaits any more must not be reported as an unretrieved exception."""
    if not future.cancelled():
        future.exception()
