"""The controller: a small facade over the deployment runners.

It admits requests for a model that is not ready (single-flight: the first starts a runner,
the others wait for the same one; the number waiting per model is bounded), routes requests to
ready deployments, and passes stop requests on. Everything a deployment does — launch, takeover,
drain, stop, the store, ledger and events — is done by its own runner (`runner.py`). A model
owns a set of deployments (its replicas): at most one of them starting at a time, requests routed
to the ready one with the fewest in flight, and the replica count set by `autoscale` (the pure
policy of `scaling.py`, run at each control loop tick).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime

from gateway.accounting.attribution import ADMIN
from gateway.api.errors import unavailable
from gateway.clock import Clock
from gateway.config.reference import Catalog, ModelSpec
from gateway.config.settings import Settings
from gateway.control import orphans
from gateway.control.activity import Activity
from gateway.control.context import ControlContext
from gateway.control.fleet import Failure, Route, ref_json
from gateway.control.policies import DeploymentView, expired_failures, heartbeats_due
from gateway.control.runner import Adoption, DeploymentRunner, StopRequest
from gateway.control.scaling import Autoscaler, ModelLoad, ReplicaLoad, ScaleAction, scale_down_choice
from gateway.control.slices import in_slices
from gateway.control.takeover import Takeover
from state import Deployment, DeploymentState, Store
from state.fleet_store import FAILURE_RESET
from tasks.provider import CapacityError, ClusterRef, Endpoint, LaunchSpec, Provider

log = logging.getLogger(__name__)
S = DeploymentState

RETRY_AFTER_QUEUE_FULL = 5
# Failsafe heartbeats in flight at once, gateway-wide.
HEARTBEAT_CONCURRENCY = 8


class Waiter:
    """One request waiting for a model to start. `wait()` returns its route or raises the
    start's error; a waiter that goes away (client gone) leaves the queue, the start goes on."""

    def __init__(self, controller: Controller, runner: DeploymentRunner) -> None:
        self.controller = controller
        self.runner = runner
        self._left = False

    @property
    def model(self) -> str:
        return self.runner.model

    @property
    def phase(self) -> str:
        return self.runner.state.value

    async def wait(self) -> Route:
        try:
            await asyncio.wait({self.runner.ready})
            return self.runner.ready.result()
        finally:
            self.leave()

    def leave(self) -> None:
        if not self._left:
            self._left = True
            self.controller.left_queue(self.runner.model)


class Controller:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self.failures: dict[str, Failure] = {}
        self.closing = False
        self.fenced = False
        self._runners: dict[str, DeploymentRunner] = {}  # by deployment id, oldest first
        # The same, by model: a request's route is found among its model's runners only (a scan of
        # 1,000 runners per request was a third of the gateway's CPU at 32 connections).
        self._by_model: dict[str, dict[str, DeploymentRunner]] = {}
        self._waiting: dict[str, int] = {}
        self._takeover = Takeover(ctx)
        self._autoscaler = Autoscaler()
        self._heartbeat_slots: asyncio.Semaphore | None = None

    # Shortcuts used by the API, the reaper and reconcile.
    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def provider(self) -> Provider:
        return self.ctx.provider

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def clock(self) -> Clock:
        return self.ctx.clock

    @property
    def activity(self) -> Activity:
        return self.ctx.activity

    @property
    def catalog(self) -> Catalog:
        return self.ctx.catalog

    # -- views ------------------------------------------------------------------------------

    def runners(self, model: str | None = None) -> list[DeploymentRunner]:
        if model is None:
            return list(self._runners.values())
        return list(self._by_model.get(model, {}).values())

    def _add(self, runner: DeploymentRunner) -> None:
        self._runners[runner.id] = runner
        self._by_model.setdefault(runner.model, {})[runner.id] = runner

    def route(self, model: str) -> Route | None:
        """The ready deployment of `model` with the fewest requests in flight."""
        ready = [r for r in self._by_model.get(model, {}).values() if r.serving]
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0].route()
        return min(ready, key=lambda r: self.ctx.activity.in_flight_of(r.id)).route()

    @property
    def routes(self) -> dict[str, Route]:
        """Every model with a ready deployment, and where its requests go."""
        return {m: route for m in self._by_model if (route := self.route(m))}

    def live(self, model: str) -> DeploymentRunner | None:
        """The model's most advanced deployment (serving, else starting, else stopping)."""
        runners = self.runners(model)
        for test in (lambda r: r.serving, lambda r: r.starting, lambda r: True):
            for runner in runners:
                if test(runner):
                    return runner
        return None

    def phase(self, model: str) -> str:
        runner = self.live(model)
        return runner.state.value if runner else S.STOPPED.value

    def waiting(self, model: str) -> int:
        return self._waiting.get(model, 0)

    def waiting_all(self) -> dict[str, int]:
        return dict(self._waiting)

    def views(self) -> list[DeploymentView]:
        return [view for _, view in self._views()]

    async def views_in_slices(self) -> list[DeploymentView]:
        """`views()` for the control loop: the loop serves requests between slices of
        deployments, so that 1,000 of them do not hold it for milliseconds."""
        runners: list[DeploymentRunner] = []
        serving: dict[str, int] = {}
        async for chunk in in_slices(list(self._runners.values())):
            for runner in chunk:
                if runner.done:
                    continue
                runners.append(runner)
                if runner.serving:
                    serving[runner.model] = serving.get(runner.model, 0) + 1
        out: list[DeploymentView] = []
        async for chunk in in_slices(runners):
            out.extend(self._view(r, serving) for r in chunk if not r.done)
        return out

    def _views(self) -> list[tuple[DeploymentRunner, DeploymentView]]:
        serving = self._serving()
        return [(r, self._view(r, serving)) for r in self._runners.values() if not r.done]

    def _serving(self) -> dict[str, int]:
        """Ready replicas taking requests, per model."""
        serving: dict[str, int] = {}
        for runner in self._runners.values():
            if runner.serving:
                serving[runner.model] = serving.get(runner.model, 0) + 1
        return serving

    def _view(self, runner: DeploymentRunner, serving: Mapping[str, int]) -> DeploymentView:
        listed = self.ctx.catalog.resolve(runner.model)
        spec = listed or runner.spec  # unlisted (a reload removed it): the values it started with
        # The model's last request (any replica), or this replica's readiness if later: a
        # replica that comes up does not keep the others hot.
        last = self.ctx.activity.last_request(runner.model)
        base = runner.ready_at or self.ctx.clock()
        ref = runner.ref
        keep_hot = spec.keep_hot_seconds
        return DeploymentView(
            deployment_id=runner.id,
            model=runner.model,
            state=runner.state,
            priority=spec.priority,
            keep_hot_seconds=keep_hot if keep_hot is not None else self.ctx.settings.keep_hot_seconds,
            last_used=max(last, base) if last else base,
            in_flight=self.ctx.activity.in_flight_of(runner.id),
            gpus=ref.gpus if ref else spec.gpus_per_replica,
            accelerators=tuple(ref.data.get("accelerators") or ()) if ref else (),
            spare_seconds=runner.spare_seconds,
            spare_since=runner.spare_at,
            replicas=serving.get(runner.model, 0),
            listed=listed is not None,
        )

    def holdings(self) -> tuple[dict[str, int], int]:
        """Live deployments by state, and the GPUs they hold (for /admin/info and /metrics)."""
        by_state: dict[str, int] = {}
        gpus = 0
        for view in self.views():
            by_state[view.state.value] = by_state.get(view.state.value, 0) + 1
            gpus += view.gpus
        return by_state, gpus

    # -- failed-model memory ----------------------------------------------------------------

    def failure(self, model: str) -> Failure | None:
        """The remembered start failure of `model`, while its TTL runs."""
        failure = self.failures.get(model)
        if failure is None or expired_failures(
            {model: failure.at}, self.ctx.clock(), self.ctx.settings.failed_model_ttl_seconds
        ):
            return None
        return failure

    def reset_failures(self, model: str | None = None) -> list[str]:
        """Forget the failure of `model` (None: of every model), here and, through the store's
        event `failure-reset`, on the other gateways of the fleet (they read failures from the
        store); the models whose failure this process remembered."""
        cleared = list(self.failures) if model is None else [model] if model in self.failures else []
        for m in cleared:
            del self.failures[m]
        what = f"failure of {model}" if model is not None else "every failure"
        self.ctx.writer.submit(
            self.ctx.store.record_event,
            kind=FAILURE_RESET,
            model=model,
            message=f"{what} reset by an admin",
            at=self.ctx.clock(),
        )
        return cleared

    def expire_failures(self, now: datetime) -> None:
        at = {m: f.at for m, f in self.failures.items()}
        for model in expired_failures(at, now, self.ctx.settings.failed_model_ttl_seconds):
            del self.failures[model]

    # -- bringing models up -----------------------------------------------------------------

    def admit(
        self, spec: ModelSpec, secrets: Mapping[str, str] | None = None, *, started_by: str | None = None
    ) -> Waiter:
        """Join (or start) the start of `spec` as one more waiter; 503 past the per-model limit.

        Synchronous on purpose: admission is decided before the caller commits to a response.
        `secrets` (a per-request Hugging Face token) are used only if this call starts it, and
        the start is then attributed to `started_by` (the request's API key id)."""
        model = spec.id
        self._refuse_when_closing(model)
        if self._waiting.get(model, 0) >= self.ctx.settings.max_waiting_requests:
            raise unavailable(
                f"Too many requests are waiting for {model} to start; retry later.",
                code="queue_full",
                retry_after=RETRY_AFTER_QUEUE_FULL,
            )
        runner = next((r for r in self.runners(model) if r.starting), None)
        if runner is None:
            runner = self._start(spec, dict(secrets or {}), started_by)
        self._waiting[model] = self._waiting.get(model, 0) + 1
        return Waiter(self, runner)

    def load(self, spec: ModelSpec, started_by: str | None = ADMIN) -> DeploymentRunner:
        """Start `spec` unless it is ready or starting (an admin's load, a pre-warm, another
        gateway's requests): no request waits here, so nothing joins the queue."""
        runner = next((r for r in self.runners(spec.id) if r.serving or r.starting), None)
        if runner is None:
            self._refuse_when_closing(spec.id)
        return runner or self._start(spec, {}, started_by)

    def starting(self, model: str) -> bool:
        """A start of `model` is under way (a request may join it without starting anything)."""
        return any(r.starting for r in self.runners(model))

    def _refuse_when_closing(self, model: str) -> None:
        """No new start once the gateway is stopping, or has lost the lease."""
        if self.closing:
            raise unavailable(
                f"This gateway is stopping; {model} cannot be started here now.",
                code="gateway_stopping",
                retry_after=RETRY_AFTER_QUEUE_FULL,
            )

    async def ensure_ready(self, spec: ModelSpec, secrets: Mapping[str, str] | None = None) -> Route:
        route = self.route(spec.id)
        if route is not None:
            return route
        return await self.admit(spec, secrets).wait()

    def left_queue(self, model: str) -> None:
        left = self._waiting.get(model, 0) - 1
        if left > 0:
            self._waiting[model] = left
        else:
            self._waiting.pop(model, None)

    def _start(
        self, spec: ModelSpec, secrets: dict[str, str], started_by: str | None, scale_up: str | None = None
    ) -> DeploymentRunner:
        """A new deployment of `spec`: its first replica (a cold start), or with `scale_up` (the
        reason) one more next to those serving. Only while this process acts (holds the lease):
        a follower, or a holder whose lease lapsed, writes no row and launches nothing."""
        if not self.ctx.acting():
            raise unavailable(
                f"This gateway does not hold the controller lease; {spec.id} cannot be started here now.",
                code="not_lease_holder",
                retry_after=RETRY_AFTER_QUEUE_FULL,
            )
        dep_id = self.ctx.new_id()  # its runner writes the row first thing
        log.info("deployment %s of %s: created (pending)", dep_id, spec.id)
        runner = DeploymentRunner(
            self.ctx,
            self,
            spec,
            deployment_id=dep_id,
            launch_spec=self._launch_spec(spec, dep_id, secrets),
            # Engines of the model on their way out release their GPUs first; replicas serving
            # next to it are not waited for.
            previous=[r for r in self.runners(spec.id) if not r.serving],
            request_secrets=bool(secrets),
            started_by=started_by,
            why=f"replica requested: {scale_up}" if scale_up else "cold start requested",
        )
        self._add(runner)
        return runner

    def _launch_spec(self, spec: ModelSpec, deployment_id: str, secrets: Mapping[str, str]) -> LaunchSpec:
        token = self.ctx.settings.hf_token
        merged = {"HF_TOKEN": token.get_secret_value()} if token is not None else {}
        merged.update(secrets)  # a per-request token wins over the configured one
        return LaunchSpec(
            deployment_id=deployment_id,
            model=spec.id,
            gpus=spec.gpus_per_replica,
            priority=spec.priority,
            model_path=spec.path,
            accelerators=spec.accelerators or (),
            engine_args=spec.engine_argv(),
            max_model_len=spec.max_model_len,
            kind=spec.kind,
            secrets=merged,
            engine_key=self.ctx.engine_key(deployment_id),
            instance_id=self.ctx.instance_id,
            weights_uri=self._weights_uri(spec),
        )

    def _weights_uri(self, spec: ModelSpec) -> str | None:
        """Where the engine streams the weights from: the model's own store copy, else the
        store prefix of the settings (SkyPilot), else nowhere (local files or Hugging Face)."""
        if spec.weights_uri:
            return spec.weights_uri
        store = self.ctx.settings.skypilot.weight_store
        if store and self.ctx.provider.name == "skypilot":
            return f"{store.rstrip('/')}/{spec.id}"
        return None

    # -- replicas ---------------------------------------------------------------------------

    async def autoscale(self, now: datetime) -> list[ScaleAction]:
        """One round of the replica policy (`scaling.py`) for models that may run more than
        one replica: start one more, or drain and stop the replica with the fewest in flight."""
        actions = self._autoscaler.decide(await self._loads(), now)
        for action in actions:
            spec = self.ctx.catalog.resolve(action.model)
            if action.direction == "up":
                if spec is not None and not spec.external and not self.closing and self.ctx.acting():
                    log.info("%s: scale up (%s)", action.model, action.reason)
                    self._start(spec, {}, None, scale_up=action.reason)  # a load, no one key
            elif action.direction == "down":
                self._scale_down(action)
        return actions

    async def _loads(self) -> list[ModelLoad]:
        loads: list[ModelLoad] = []
        by_model: dict[str, list[DeploymentRunner]] = {}
        async for chunk in in_slices(list(self._runners.values())):  # 1,000 deployments, 1,000 models
            for runner in chunk:
                by_model.setdefault(runner.model, []).append(runner)
        async for models in in_slices(sorted(by_model.items())):
            loads.extend(load for model, runners in models if (load := self._load_of(model, runners)))
        return loads

    def _load_of(self, model: str, runners: list[DeploymentRunner]) -> ModelLoad | None:
        spec = self.ctx.catalog.resolve(model) or runners[0].spec
        ready = sum(r.serving for r in runners)
        if spec.replicas.max <= 1 and ready <= 1:
            return None  # one engine: the autoscaler has nothing to decide
        up, down = spec.scale_up_seconds, spec.scale_down_seconds
        return ModelLoad(
            model=model,
            ready=ready,
            starting=sum(r.starting for r in runners),
            # in flight here and on the other gateways of a fleet, waiting here and there
            load=self.ctx.activity.in_flight(model)
            + self.waiting(model)
            + self.ctx.activity.remote_waiting(model),
            min_replicas=spec.replicas.min,
            max_replicas=spec.replicas.max,
            target=spec.target_in_flight_per_replica,
            up_seconds=up if up is not None else self.ctx.settings.scale_up_seconds,
            down_seconds=down if down is not None else self.ctx.settings.scale_down_seconds,
        )

    def _scale_down(self, action: ScaleAction) -> None:
        serving = {r.id: r for r in self.runners(action.model) if r.serving}
        choice = scale_down_choice(
            ReplicaLoad(r.id, self.ctx.activity.in_flight_of(r.id), r.ready_at or r.started_at)
            for r in serving.values()
        )
        if choice is not None:
            log.info("%s: scale down %s (%s)", action.model, choice, action.reason)
            serving[choice].request_stop(StopRequest("scale-down", action.reason, drain=True))

    # -- what runners ask of their owner ----------------------------------------------------

    async def take_over(self, runner: DeploymentRunner, exc: CapacityError) -> ClusterRef:
        return await self._takeover.take_over(runner, exc, self._views())

    async def claim_spare(self, runner: DeploymentRunner) -> ClusterRef | None:
        return await self._takeover.claim_spare(runner, self._views())

    def remember_failure(self, runner: DeploymentRunner, error: str) -> None:
        self.failures[runner.model] = Failure(
            model=runner.model, error=error, at=self.ctx.clock(), deployment_id=runner.id
        )

    def runner_done(self, runner: DeploymentRunner) -> None:
        if self._runners.get(runner.id) is runner:
            del self._runners[runner.id]
            same_model = self._by_model[runner.model]
            del same_model[runner.id]
            if not same_model:
                del self._by_model[runner.model]
        self.ctx.activity.forget(runner.id)

    def heartbeat_slot(self) -> asyncio.Semaphore:
        if self._heartbeat_slots is None:
            self._heartbeat_slots = asyncio.Semaphore(HEARTBEAT_CONCURRENCY)
        return self._heartbeat_slots

    # -- taking models down -----------------------------------------------------------------

    def stop_deployment(
        self, deployment_id: str, *, kind: str, reason: str, force: bool = False, spare: bool = False
    ) -> bool:
        """Ask a deployment to stop; False if there is none or (without `force`) it has requests
        in flight. It takes no new request from this moment on; with `force`, requests in flight
        get `drain_seconds`; with `spare`, its cluster may stay up as a spare first."""
        runner = self._runners.get(deployment_id)
        if runner is None or (not force and self.ctx.activity.in_flight_of(deployment_id) > 0):
            return False
        return runner.request_stop(StopRequest(kind, reason, drain=force, spare=spare))

    async def stop_model(self, model: str, *, kind: str, reason: str) -> bool:
        """Stop every deployment of `model`, whatever it is doing; True if there was one."""
        runners = self.runners(model)
        for runner in runners:
            runner.request_stop(StopRequest(kind, reason, drain=True))
        if runners:
            await asyncio.wait({r.task for r in runners})
        return bool(runners)

    async def stop_all(self, *, kind: str, reason: str) -> list[str]:
        """Stop every deployment; the models that had one (what was stopped)."""
        models = sorted({r.model for r in self._runners.values()})
        await asyncio.gather(*(self.stop_model(m, kind=kind, reason=reason) for m in models))
        return models

    def engine_error(self, route: Route, reason: str) -> None:
        """The proxy could not talk to an engine: its runner checks whether it died."""
        runner = self._runners.get(route.deployment_id or "")
        if runner is not None:
            runner.check_engine(reason)

    async def settle(self) -> None:
        """Wait until every deployment asked to stop, or ending, has ended or become a spare,
        and what they wrote is in the store (for the reaper, shutdown and tests)."""
        while ending := [r for r in self._runners.values() if r.stop_request is not None or r.done]:
            await asyncio.gather(*(r.stopped_or_spare() for r in ending))
        await self.ctx.ledger.drain()
        await self.ctx.writer.barrier()

    async def shutdown(self) -> None:
        """Stop every deployment this process owns (drained), then anything else the provider
        still lists for this installation. Nothing at all once the lease is lost."""
        self.closing = True
        if self.fenced:
            return
        runners = list(self._runners.values())
        for runner in runners:
            runner.request_stop(StopRequest("shutdown-stop", "gateway shutting down", drain=True))
        if runners:
            await asyncio.wait({r.task for r in runners})
        await orphans.sweep(self, at_shutdown=True)

    async def hand_over(self) -> list[str]:
        """A graceful stop while other gateways of the fleet serve: every runner lets go of its
        deployment at once without touching the engine, the store or the ledger (as on a lost
        lease), for the next lease holder's reconcile to adopt; the deployment ids left so."""
        self.closing = True
        runners = list(self._runners.values())
        for runner in runners:
            runner.abandon()
        if runners:
            await asyncio.wait({r.task for r in runners})
        return [r.id for r in runners]

    def held_clusters(self) -> set[str]:
        """The names of the clusters the runners hold."""
        return {r.ref.name for r in self._runners.values() if r.ref is not None}

    def owns(self, ref: ClusterRef, held: set[str] | None = None) -> bool:
        """A runner holds the cluster (by name: a takeover or a spare swap moves it to another
        deployment, its labels keep the first one's id), or its deployment has a runner (a
        launch in progress holds no ref yet). `held`: `held_clusters()`, when asked for many."""
        if ref.deployment_id in self._runners:
            return True
        return ref.name in (held if held is not None else self.held_clusters())

    def abandon(self) -> None:
        """The lease is lost: every runner stops at once without touching its engine; the new
        lease holder adopts them."""
        self.fenced = self.closing = True
        for runner in list(self._runners.values()):
            runner.abandon()

    # -- after a restart --------------------------------------------------------------------

    def adopt(
        self,
        dep: Deployment,
        spec: ModelSpec,
        ref: ClusterRef,
        endpoint: Endpoint | None,
        *,
        reason: str,
    ) -> DeploymentRunner:
        """Take back an engine an earlier gateway process left: serve it at once (`endpoint`
        known) or wait for it to finish loading."""
        ref = self.ctx.keyed(ref)
        self._resume_ledger(dep.id, spec, ref)
        runner = DeploymentRunner(
            self.ctx,
            self,
            spec,
            deployment_id=dep.id,
            launch_spec=self._launch_spec(spec, dep.id, {}),
            adoption=Adoption(ref=ref, state=DeploymentState(dep.state), endpoint=endpoint),
        )
        self._add(runner)
        self.ctx.store.update_deployment(dep.id, cluster=ref.name, handle=ref_json(ref))
        self.ctx.store.record_event(
            kind="reconciled", model=spec.id, deployment_id=dep.id, message=reason, at=self.ctx.clock()
        )
        return runner

    def close_stale(self, dep: Deployment, message: str, *, cost_until: datetime | None = None) -> None:
        """Mark a deployment of an earlier gateway process stopped, with an event saying why.
        Its open cost interval ends at `cost_until` (default: now, when its engine was stopped)."""
        state = DeploymentState(dep.state)
        now = self.ctx.clock()
        if state is not S.STOPPING:
            self.ctx.store.transition(dep.id, expected=state, new=S.STOPPING, at=now)
        self.ctx.store.transition(dep.id, expected=S.STOPPING, new=S.STOPPED, at=now)
        self.ctx.store.close_interval(dep.id, at=cost_until or now)
        self.ctx.store.record_event(
            kind="reconciled", model=dep.model, deployment_id=dep.id, message=message, at=now
        )
        log.info("deployment %s of %s: %s", dep.id, dep.model, message)

    def _resume_ledger(self, deployment_id: str, spec: ModelSpec, ref: ClusterRef) -> None:
        """An adopted deployment keeps its open cost interval (the cluster billed all along)."""
        ledger = self.ctx.ledger
        for interval in self.ctx.store.open_intervals():
            if interval.deployment_id == deployment_id:
                ledger.restart(
                    deployment_id,
                    interval.phase,
                    interval.started_at,
                    interval.cluster,
                    interval.gpus,
                    interval.hourly_price,
                )
                return
        price = ledger.prices.hourly(ref, ref.gpus, spec.accelerators or ())
        ledger.held(deployment_id, cluster=ref.name, gpus=ref.gpus, hourly_price=price)

    # -- periodic bookkeeping (the reaper) ---------------------------------------------------

    async def record_activity(self, since: datetime, now: datetime) -> None:
        """Tell the ledger which ready deployments served traffic since the previous tick (in
        slices of deployments, the loop serving requests in between)."""
        activity = self.ctx.activity
        async for chunk in in_slices(list(self._runners.values())):
            windows = []
            for runner in chunk:
                if runner.state is S.READY and not runner.done:
                    last = activity.last_request_of(runner.id)  # per replica: an unused one is idle
                    served = activity.in_flight_of(runner.id) > 0 or (last is not None and last > since)
                    windows.append((runner.id, runner.model, served))
            self.ctx.ledger.activity(windows, since=since)  # the ledger writes them in order
        self.ctx.ledger.checked(now)

    async def heartbeat_due(self, now: datetime, views: list[DeploymentView]) -> None:
        """Re-arm the failsafe of every engine held, at the provider's interval (the calls run
        in the background)."""
        interval = self.ctx.provider.heartbeat_interval_seconds
        if interval is None:
            return
        async for chunk in in_slices(views):
            beats = {}
            for view in chunk:
                runner = self._runners.get(view.deployment_id)
                if runner is not None and runner.last_beat is not None:
                    beats[runner.id] = runner.last_beat
            for dep_id in heartbeats_due(chunk, beats, now, interval):
                if (runner := self._runners.get(dep_id)) is not None and not runner.done:
                    runner.heartbeat(now)

    async def flush_activity(self) -> None:
        """Write the last-used times gathered in memory since the previous flush: the snapshot
        is taken here, on the loop; the database writer writes it. A failed write is retried at
        the next flush."""
        batch = self.ctx.activity.take_dirty()
        if not batch:
            return
        deployments = {}
        async for chunk in in_slices(list(self._runners.values())):
            deployments.update({r.id: batch[r.model] for r in chunk if r.model in batch})
        try:
            await self.ctx.writer.run(self.ctx.store.touch_models, batch, deployments)
        except Exception as exc:
            log.error("last-used flush failed, retried at the next one: %s: %s", type(exc).__name__, exc)
            self.ctx.activity.restore(batch)
