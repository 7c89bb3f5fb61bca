"""The controller: the one writer of deployment state.

`ensure_ready(spec)` brings a model up (single-flight: the first caller starts the launch,
every other caller awaits the same task); when the provider has no capacity, a lower-priority
model's engine is taken over. `stop_soon()` takes one down, `shutdown()` stops everything this
process started. The routing table lives in memory so the request path never queries the
database. Restart handling (adopt / close) is in `reconcile.py`, schedules in `reaper.py`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gateway.accounting.ledger import Ledger
from gateway.accounting.metrics import Metrics
from gateway.api.errors import GatewayError, bad_gateway, unavailable
from gateway.clock import Clock
from gateway.config.reference import Catalog, ModelSpec
from gateway.config.settings import Settings
from gateway.control.activity import Activity
from gateway.control.fleet import Failure, LiveDeployment, Route, ref_json
from gateway.control.policies import (
    DeploymentView,
    Eviction,
    Request,
    choose_victim,
    expired_failures,
    heartbeats_due,
)
from state import ALLOWED, Deployment, DeploymentState, Store
from state.writer import Writer
from tasks.provider import CapacityError, ClusterRef, Endpoint, LaunchSpec, Provider, ProviderError

log = logging.getLogger(__name__)
S = DeploymentState

# Seconds a client is told to wait before retrying after a 503.
RETRY_AFTER_QUEUE_FULL = 5
RETRY_AFTER_CAPACITY = 30
RETRY_AFTER_COLD_START = 30


class Controller:
    def __init__(
        self,
        *,
        settings: Settings,
        provider: Provider,
        store: Store,
        clock: Clock,
        activity: Activity,
        catalog: Catalog,
        ledger: Ledger,
        metrics: Metrics,
        writer: Writer,
    ) -> None:
        self.settings = settings
        self.provider = provider
        self.store = store
        self.clock = clock
        self.activity = activity
        self.catalog = catalog
        self.ledger = ledger
        self.metrics = metrics
        self.writer = writer
        self.routes: dict[str, Route] = {}
        self.failures: dict[str, Failure] = {}
        self._live: dict[str, LiveDeployment] = {}  # by model: at most one live deployment per model
        self._launches: dict[str, asyncio.Task[Route]] = {}
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, int] = {}
        self._heartbeats: dict[str, datetime] = {}  # deployment id -> last failsafe heartbeat
        self._evictions: list[Eviction] = []
        self._checks: dict[str, asyncio.Task[None]] = {}  # deployment id -> engine health check

    # -- views ------------------------------------------------------------------------------

    def phase(self, model: str) -> str:
        live = self._live.get(model)
        return live.state.value if live else S.STOPPED.value

    def waiting(self, model: str) -> int:
        return self._waiting.get(model, 0)

    def waiting_all(self) -> dict[str, int]:
        return dict(self._waiting)

    def holdings(self) -> tuple[dict[str, int], int]:
        """Live deployments by state, and the GPUs they hold (for /admin/info and /metrics)."""
        by_state: dict[str, int] = {}
        gpus = 0
        for view in self.views():
            by_state[view.state.value] = by_state.get(view.state.value, 0) + 1
            gpus += view.gpus
        return by_state, gpus

    def live(self, model: str) -> LiveDeployment | None:
        return self._live.get(model)

    def effective_spec(self, live: LiveDeployment) -> ModelSpec:
        """The model's current settings (admin overrides apply to running deployments too)."""
        return self.catalog.resolve(live.spec.id) or live.spec

    def views(self) -> list[DeploymentView]:
        views = []
        for model, live in self._live.items():
            spec = self.effective_spec(live)
            last = self.activity.last_used(model)
            base = live.ready_at or self.clock()
            accelerators = tuple(live.ref.data.get("accelerators") or ()) if live.ref else ()
            views.append(
                DeploymentView(
                    deployment_id=live.deployment_id,
                    model=model,
                    state=live.state,
                    priority=spec.priority,
                    keep_hot_seconds=(
                        spec.keep_hot_seconds
                        if spec.keep_hot_seconds is not None
                        else self.settings.keep_hot_seconds
                    ),
                    last_used=max(last, base) if last else base,
                    in_flight=self.activity.in_flight(model),
                    gpus=live.ref.gpus if live.ref else spec.gpus_per_replica,
                    accelerators=accelerators,
                )
            )
        return views

    def failure(self, model: str) -> Failure | None:
        """The remembered start failure of `model`, while its TTL runs."""
        failure = self.failures.get(model)
        if failure is None or expired_failures(
            {model: failure.at}, self.clock(), self.settings.failed_model_ttl_seconds
        ):
            return None
        return failure

    def reset_failures(self, model: str | None = None) -> list[str]:
        cleared = [model] if model is not None and model in self.failures else []
        if model is None:
            cleared = list(self.failures)
        for m in cleared:
            del self.failures[m]
        return cleared

    def expire_failures(self, now: datetime) -> None:
        at = {m: f.at for m, f in self.failures.items()}
        for model in expired_failures(at, now, self.settings.failed_model_ttl_seconds):
            del self.failures[model]

    # -- bringing models up -----------------------------------------------------------------

    def admit(self, spec: ModelSpec, secrets: Mapping[str, str] | None = None) -> asyncio.Task[Route]:
        """Join (or start) the launch of `spec` as one more waiter; 503 past the per-model limit.

        Synchronous on purpose: admission is decided before the caller commits to a response.
        Waiters are counted per launch and all released together when the launch ends, so a
        waiter that goes away early can never leak a slot. `secrets` (a per-request Hugging
        Face token) are used only if this call starts the launch."""
        model = spec.id
        if self._waiting.get(model, 0) >= self.settings.max_waiting_requests:
            raise unavailable(
                f"Too many requests are waiting for {model} to start; retry later.",
                code="queue_full",
                retry_after=RETRY_AFTER_QUEUE_FULL,
            )
        task = self._launches.get(model)
        if task is None:
            task = asyncio.create_task(self._bring_up(spec, dict(secrets or {})), name=f"launch {model}")
            self._launches[model] = task
            task.add_done_callback(self._launch_done)
        self._waiting[model] = self._waiting.get(model, 0) + 1
        return task

    async def ensure_ready(self, spec: ModelSpec, secrets: Mapping[str, str] | None = None) -> Route:
        route = self.routes.get(spec.id)
        if route is not None:
            return route
        # shield: a waiter that goes away (client disconnect) must not cancel the launch
        return await asyncio.shield(self.admit(spec, secrets))

    def _launch_done(self, task: asyncio.Task[Route]) -> None:
        model = task.get_name().removeprefix("launch ")
        if self._launches.get(model) is task:
            del self._launches[model]
            self._waiting.pop(model, None)
        if not task.cancelled():
            task.exception()  # retrieved here so a launch nobody awaits any more is not reported

    async def _bring_up(self, spec: ModelSpec, secrets: dict[str, str]) -> Route:
        model = spec.id
        stopping = self._stops.get(model)
        if stopping is not None:  # the previous engine must release its GPUs first
            await asyncio.shield(stopping)
        dep_id = uuid.uuid4().hex[:12]
        started = self.clock()
        self.store.create_deployment(
            deployment_id=dep_id,
            model=model,
            provider=self.provider.name,
            gpus=spec.gpus_per_replica,
            at=started,
        )
        live = LiveDeployment(deployment_id=dep_id, spec=spec, state=S.PENDING)
        self._live[model] = live
        self._event(
            "launch", live, f"cold start requested ({spec.gpus_per_replica} GPU, priority {spec.priority})"
        )
        log.info("deployment %s of %s: created (pending)", dep_id, model)
        launch_spec = self._launch_spec(spec, dep_id, secrets)
        timeout = self.settings.cold_start_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                self._hold(live, None)  # priced from the settings until the provider says more
                self._move(live, S.LAUNCHING)
                try:
                    live.ref = await self.provider.launch(launch_spec)
                except CapacityError as exc:
                    live.ref = await self._take_over(live, launch_spec, exc)
                self._hold(live, live.ref)
                self._heartbeats[dep_id] = self.clock()  # the launch armed the failsafe
                self.store.update_deployment(dep_id, cluster=live.ref.name, handle=ref_json(live.ref))
                self._move(live, S.LOADING)
                endpoint = await self.provider.wait_ready(live.ref)
        except TimeoutError:
            await self._fail(live, f"not ready after {timeout:g}s (cold start timeout)", remember=True)
            raise unavailable(
                f"{model} did not become ready within {timeout:g}s.",
                code="cold_start_timeout",
                retry_after=RETRY_AFTER_COLD_START,
            ) from None
        except CapacityError as exc:
            await self._fail(live, f"no capacity: {exc}", remember=False)
            self.ledger.discard(dep_id)  # no GPUs were ever held
            raise unavailable(
                f"No GPU capacity for {model}: {exc}",
                code="capacity_unavailable",
                retry_after=RETRY_AFTER_CAPACITY,
            ) from exc
        except asyncio.CancelledError:
            await self._teardown(
                live, kind="launch-cancelled", reason="launch cancelled (shutdown or unload)"
            )
            raise
        except Exception as exc:  # ProviderError, or anything a provider let through
            error = str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
            await self._fail(live, error, remember=True)
            raise bad_gateway(
                f"The engine for {model} failed to start: {exc}", code="engine_start_failed"
            ) from exc
        now = self.clock()
        live.ready_at = now
        self._move(live, S.READY, endpoint=endpoint.base_url)
        self._observe_cold_start(dep_id, model)
        self.activity.touch(model, now)
        route = Route(model=model, base_url=endpoint.base_url, deployment_id=dep_id)
        self.routes[model] = route
        self._event(
            "ready", live, f"ready at {endpoint.base_url} after {(now - started).total_seconds():.1f}s"
        )
        return route

    def _launch_spec(self, spec: ModelSpec, deployment_id: str, secrets: Mapping[str, str]) -> LaunchSpec:
        token = self.settings.hf_token
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
        )

    async def _take_over(
        self, live: LiveDeployment, launch_spec: LaunchSpec, exc: CapacityError
    ) -> ClusterRef:
        """No capacity: move the model onto a lower-priority model's engine, or re-raise."""
        spec = self.effective_spec(live)
        request = Request(
            model=spec.id,
            priority=spec.priority,
            gpus=spec.gpus_per_replica,
            accelerators=spec.accelerators or (),
        )
        now = self.clock()
        victim = choose_victim(
            self.views(),
            request,
            evictions=self._evictions,
            now=now,
            cooldown_seconds=self.settings.eviction_cooldown_seconds,
        )
        if victim is None:
            raise exc
        target = self._live[victim.model]
        assert target.ref is not None
        self.routes.pop(victim.model, None)
        self._move(target, S.DRAINING)
        self._event(
            "evicted", target, f"evicted by {spec.id} (priority {spec.priority} > {victim.priority}): {exc}"
        )
        log.info("%s takes over %s from %s", spec.id, target.ref.name, victim.model)
        await self.activity.wait_idle(victim.model, self.settings.drain_seconds)
        try:
            ref = await self.provider.swap(target.ref, launch_spec)
        except Exception as swap_exc:
            self._move(target, S.FAILED, error=f"swap to {spec.id} failed: {swap_exc}")
            self._forget(target)
            raise
        self._move(target, S.STOPPING)
        self._move(target, S.STOPPED)
        self._forget(target)
        # The requester's cost starts now, on the victim's cluster: before, it held nothing.
        self.ledger.discard(live.deployment_id)
        self._hold(live, ref)
        self.ledger.state(live.deployment_id, spec.id, S.LAUNCHING, self.clock())
        self._evictions = [
            e
            for e in self._evictions
            if (now - e.at).total_seconds() < self.settings.eviction_cooldown_seconds
        ]
        self._evictions.append(Eviction(victim=victim.model, by=spec.id, at=now))
        self._event(
            "takeover", live, f"took over {ref.name} from {victim.model} (priority {victim.priority})"
        )
        return ref

    def engine_error(self, route: Route, reason: str) -> None:
        """The proxy could not talk to an engine: check in the background whether it died."""
        live = self._live.get(route.model)
        if live is None or live.deployment_id != route.deployment_id or live.state is not S.READY:
            return
        if route.model in self._stops or live.deployment_id in self._checks:
            return
        task = asyncio.create_task(self._check_engine(live, reason), name=f"check {route.model}")
        self._checks[live.deployment_id] = task
        task.add_done_callback(lambda _: self._checks.pop(live.deployment_id, None))

    async def _check_engine(self, live: LiveDeployment, reason: str) -> None:
        if live.ref is None or await self.provider.probe(live.ref) is not None:
            return  # alive: a one-off error (the client's request, a timeout)
        model = live.spec.id
        if self._live.get(model) is not live or live.state is not S.READY:
            return
        self.routes.pop(model, None)  # the next request starts a new engine
        error = f"engine died while serving ({reason})"
        self._move(live, S.FAILED, error=error)
        self._event("engine-failed", live, error)
        try:
            await self.provider.stop(live.ref)  # what is left of it, and its GPUs
        finally:
            self._forget(live)

    # -- taking models down -----------------------------------------------------------------

    def stop_soon(
        self, model: str, *, kind: str, reason: str, force: bool = False
    ) -> asyncio.Task[None] | None:
        """Start stopping `model`'s deployment in the background; None if there is nothing to stop
        or (without `force`) it has requests in flight. The routing entry is removed at once,
        in the same step as the in-flight check, so no new request is routed to it; with
        `force`, requests in flight get `drain_seconds` to finish."""
        live = self._live.get(model)
        if live is None or live.state is not S.READY or model in self._stops:
            return None
        if self.activity.in_flight(model) > 0 and not force:
            return None
        self.routes.pop(model, None)
        task = asyncio.create_task(
            self._teardown(live, kind=kind, reason=reason, drain=force), name=f"stop {model}"
        )
        self._stops[model] = task
        task.add_done_callback(
            lambda t: self._stops.pop(model, None) if self._stops.get(model) is t else None
        )
        return task

    async def stop_model(self, model: str, *, kind: str, reason: str) -> bool:
        """Stop `model` whatever it is doing: cancel its launch, or drain and stop its engine."""
        launch = self._launches.get(model)
        if launch is not None:
            launch.cancel()
            await asyncio.gather(launch, return_exceptions=True)
            return True
        task = self.stop_soon(model, kind=kind, reason=reason, force=True) or self._stops.get(model)
        if task is None:
            return False
        await asyncio.shield(task)
        return True

    async def stop_all(self, *, kind: str, reason: str) -> list[str]:
        models = sorted(set(self._live) | set(self._launches))
        await asyncio.gather(*(self.stop_model(m, kind=kind, reason=reason) for m in models))
        return models

    async def _teardown(self, live: LiveDeployment, *, kind: str, reason: str, drain: bool = False) -> None:
        model = live.spec.id
        self.routes.pop(model, None)
        self._event(kind, live, reason)
        if drain and live.state is S.READY:
            self._move(live, S.DRAINING)
            await self.activity.wait_idle(model, self.settings.drain_seconds)
        if live.state not in (S.STOPPING, S.STOPPED, S.FAILED):
            self._move(live, S.STOPPING)
        try:
            if live.ref is not None:
                await self.provider.stop(live.ref)
        except Exception as exc:
            log.exception("deployment %s of %s: stop failed", live.deployment_id, model)
            self._move(live, S.FAILED, error=f"stop failed: {exc}")
            self._event("stop-failed", live, str(exc))
        else:
            if live.state is S.STOPPING:
                self._move(live, S.STOPPED)
        finally:
            self._forget(live)

    async def _fail(self, live: LiveDeployment, error: str, *, remember: bool) -> None:
        log.warning("deployment %s of %s: launch failed: %s", live.deployment_id, live.spec.id, error)
        self._move(live, S.FAILED, error=error)
        self._event("launch-failed", live, error)
        if remember:
            self.failures[live.spec.id] = Failure(model=live.spec.id, error=error, at=self.clock())
        try:
            if live.ref is not None:
                await self.provider.stop(live.ref)  # free the GPUs of what did start
        finally:
            self._forget(live)

    def _forget(self, live: LiveDeployment) -> None:
        self._heartbeats.pop(live.deployment_id, None)
        if self._live.get(live.spec.id) is live:
            del self._live[live.spec.id]

    # -- lifecycle --------------------------------------------------------------------------

    def adopt(
        self, dep: Deployment, spec: ModelSpec, ref: ClusterRef, endpoint: Endpoint, *, reason: str
    ) -> None:
        """Take back a healthy engine an earlier gateway process left running: route to it."""
        live = LiveDeployment(deployment_id=dep.id, spec=spec, state=DeploymentState(dep.state), ref=ref)
        self._resume_ledger(live)
        for step in (S.LAUNCHING, S.LOADING, S.READY):  # walk the state machine up to ready
            if live.state is not S.READY and step in ALLOWED[live.state]:
                self._move(live, step, **({"endpoint": endpoint.base_url} if step is S.READY else {}))
        now = self.clock()
        live.ready_at = now
        self._live[spec.id] = live
        self.routes[spec.id] = Route(model=spec.id, base_url=endpoint.base_url, deployment_id=dep.id)
        self.activity.touch(spec.id, now)
        self._heartbeats[dep.id] = now
        self.store.update_deployment(dep.id, cluster=ref.name, handle=ref_json(ref))
        self._event("reconciled", live, reason)

    def close_stale(self, dep: Deployment, message: str, *, cost_until: datetime | None = None) -> None:
        """Mark a deployment of an earlier gateway process stopped, with an event saying why.
        Its open cost interval ends at `cost_until` (default: now, when its engine was stopped)."""
        state = DeploymentState(dep.state)
        if state is not S.STOPPING:
            self.store.transition(dep.id, expected=state, new=S.STOPPING, at=self.clock())
        self.store.transition(dep.id, expected=S.STOPPING, new=S.STOPPED, at=self.clock())
        self.store.close_interval(dep.id, at=cost_until or self.clock())
        self.store.record_event(
            kind="reconciled", model=dep.model, deployment_id=dep.id, message=message, at=self.clock()
        )
        log.info("deployment %s of %s: %s", dep.id, dep.model, message)

    def _resume_ledger(self, live: LiveDeployment) -> None:
        """An adopted deployment keeps its open cost interval (the cluster billed all along)."""
        for interval in self.store.open_intervals():
            if interval.deployment_id == live.deployment_id:
                self.ledger.restart(
                    live.deployment_id,
                    interval.phase,
                    interval.started_at,
                    interval.cluster,
                    interval.gpus,
                    interval.hourly_price,
                )
                return
        self._hold(live, live.ref)

    def record_activity(self, since: datetime, now: datetime) -> None:
        """Tell the ledger which ready deployments served traffic since the previous tick."""
        windows = []
        for model, live in self._live.items():
            if live.state is S.READY:
                last = self.activity.last_request(model)
                served = self.activity.in_flight(model) > 0 or (last is not None and last > since)
                windows.append((live.deployment_id, model, served))
        self.ledger.activity(windows, since=since)
        self.store.check_open_intervals(now)

    async def heartbeat_due(self, now: datetime) -> None:
        """Re-arm the failsafe of every engine the gateway holds, at the provider's interval."""
        interval = self.provider.heartbeat_interval_seconds
        if interval is None:
            return
        holding = {v.deployment_id: v for v in self.views()}
        for dep_id in heartbeats_due(holding.values(), self._heartbeats, now, interval):
            live = self._live.get(holding[dep_id].model)
            if live is None or live.ref is None:
                continue
            try:
                await self.provider.heartbeat(live.ref)
                self._heartbeats[dep_id] = now
            except ProviderError as exc:
                log.warning("deployment %s of %s: heartbeat failed: %s", dep_id, live.spec.id, exc)

    async def shutdown(self) -> None:
        """Stop every engine this process started, including launches still in progress."""
        launches = list(self._launches.values())
        for task in launches:
            task.cancel()
        await asyncio.gather(*launches, return_exceptions=True)
        for model in list(self._live):
            self.stop_soon(model, kind="shutdown-stop", reason="gateway shutting down", force=True)
        await asyncio.gather(*self._stops.values(), return_exceptions=True)
        for info in await self.provider.list():  # anything still known to the provider
            await self.provider.stop(info.ref)

    async def flush_activity(self) -> None:
        """Write the last-used times gathered in memory since the previous flush: the snapshot
        is taken here, on the loop; the database writer writes it. A failed write is retried at
        the next flush."""
        batch = self.activity.take_dirty()
        if not batch:
            return
        deployments = {self._live[m].deployment_id: at for m, at in batch.items() if m in self._live}
        try:
            await self.writer.run(self.store.touch_models, batch, deployments)
        except Exception as exc:
            log.error("last-used flush failed, retried at the next one: %s: %s", type(exc).__name__, exc)
            self.activity.restore(batch)

    # -- helpers ----------------------------------------------------------------------------

    def _hold(self, live: LiveDeployment, ref: ClusterRef | None) -> None:
        spec = live.spec
        gpus = ref.gpus if ref is not None else spec.gpus_per_replica
        price = self.ledger.prices.hourly(ref, gpus, spec.accelerators or ())
        self.ledger.held(live.deployment_id, cluster=ref.name if ref else None, gpus=gpus, hourly_price=price)

    def _observe_cold_start(self, deployment_id: str, model: str) -> None:
        dep = self.store.get_deployment(deployment_id)
        if dep is None or not (dep.launching_at and dep.loading_at and dep.ready_at):
            return
        for phase, seconds in (
            ("launching", (dep.loading_at - dep.launching_at).total_seconds()),
            ("loading", (dep.ready_at - dep.loading_at).total_seconds()),
            ("total", (dep.ready_at - (dep.pending_at or dep.launching_at)).total_seconds()),
        ):
            self.metrics.cold_start.labels(model=model, phase=phase).observe(seconds)

    def _move(self, live: LiveDeployment, new: DeploymentState, **fields: Any) -> None:
        old = live.state
        at = self.clock()
        if not self.store.transition(live.deployment_id, expected=old, new=new, at=at, **fields):
            raise ProviderError(f"deployment {live.deployment_id} is no longer {old}")
        self.ledger.state(live.deployment_id, live.spec.id, new, at)
        live.state = new
        log.info("deployment %s of %s: %s -> %s", live.deployment_id, live.spec.id, old, new)

    def _event(self, kind: str, live: LiveDeployment, message: str) -> None:
        self.store.record_event(
            kind=kind, model=live.spec.id, deployment_id=live.deployment_id, message=message, at=self.clock()
        )


__all__ = ["Controller", "GatewayError", "Route"]
