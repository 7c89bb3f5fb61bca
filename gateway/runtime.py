"""The gateway's object graph and its life: built by `Runtime.build`, started at once (every
gateway serves), acting once this process holds the controller lease (until then it follows:
gateway/fleet), stopped step by step so that one failing step skips nothing. `create_app`
(app.py) puts the HTTP routes on top."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from gateway.accounting.ledger import Ledger, PriceBook
from gateway.accounting.loop_lag import watch_loop_lag
from gateway.accounting.metrics import KnownModel, Metrics, pick_known
from gateway.accounting.usage import UsageRecorder
from gateway.api.openai_routes import OpenAIGateway
from gateway.auth.keyring import KeyRing
from gateway.clock import Clock, system_clock
from gateway.config.reference import Catalog, load_reference
from gateway.config.settings import Settings
from gateway.control.activity import Activity
from gateway.control.context import ControlContext, gateway_secret, new_deployment_id
from gateway.control.controller import Controller
from gateway.control.fencing import FencedProvider
from gateway.control.fleet import Route
from gateway.control.lease import ControllerLease, stop_this_process
from gateway.control.reaper import Reaper
from gateway.control.reconcile import reconcile
from gateway.fleet.follower import REPORT_LIFETIMES, Follower
from gateway.fleet.launches import LaunchRequests
from gateway.fleet.notify import Listener, listens
from gateway.proxy.upstream import Proxy
from state import Store
from state.fleet_store import DEPLOYMENTS_CHANNEL, REPORTS_CHANNEL
from state.writer import Writer
from tasks.local import LocalConfig, LocalProvider
from tasks.provider import Provider

log = logging.getLogger(__name__)


def build_provider(settings: Settings) -> Provider:
    if settings.provider == "local":
        return LocalProvider(
            LocalConfig(
                engine_command=settings.local.engine_command,
                gpu_ids=tuple(settings.local.resolved_gpu_ids()),
                log_dir=settings.data_dir / "engines",
                stop_grace_seconds=settings.local.stop_grace_seconds,
                env=settings.local.env,
                env_passthrough=tuple(settings.local.env_passthrough),
            )
        )
    return build_skypilot_provider(settings)


def build_skypilot_provider(settings: Settings) -> Provider:
    try:
        from tasks.sky_client import SdkSkyClient, SkyClientConfig
        from tasks.sky_task import SkyTaskConfig
        from tasks.skypilot import SkyPilotConfig, SkyPilotProvider
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ProviderUnavailable(
            f"provider 'skypilot' needs `pip install llm-gateway[skypilot]`: {exc}"
        ) from exc
    sky = settings.skypilot
    try:
        client = SdkSkyClient(
            SkyClientConfig(
                long_threads=sky.sdk_long_threads,
                short_threads=sky.sdk_short_threads,
                call_timeout_seconds=sky.call_timeout_seconds,
                launch_timeout_seconds=sky.launch_timeout_seconds,
                long_timeout_seconds=sky.down_timeout_seconds,
            )
        )
    except ImportError as exc:
        raise ProviderUnavailable(
            f"provider 'skypilot' needs `pip install llm-gateway[skypilot]`: {exc}"
        ) from exc
    task = SkyTaskConfig(
        default_accelerators=tuple(sky.default_accelerators),
        disk_size_gb=sky.disk_size_gb,
        use_spot=sky.use_spot,
        vllm_version=sky.vllm_version,
        image=sky.image,
        infra=sky.infra,
        extra_labels=dict(sky.labels),
        network=sky.network,
        install=sky.install,
        disk_tier=sky.disk_tier,
        cache_uri=sky.cache_uri,
        release_wait_seconds=sky.release_wait_seconds,
    )
    return SkyPilotProvider(
        client,
        SkyPilotConfig(
            task=task, failsafe_minutes=sky.failsafe_minutes, job_check_seconds=sky.job_check_seconds
        ),
    )


class ProviderUnavailable(ValueError):
    pass


def price_book(settings: Settings, provider: str) -> PriceBook:
    costs = settings.costs
    if provider == "local":
        return PriceBook(per_gpu_hour={}, default_gpu_hour=costs.local_gpu_hour)
    return PriceBook(per_gpu_hour=costs.gpu_hour, default_gpu_hour=costs.default_gpu_hour)


# Attempts (a second apart) to write the ledger's last changes at shutdown.
LEDGER_DRAIN_TRIES = 5
# How long a holder that stops waits for a follower to take the lease over (then it takes it
# back and stops the engines): this many takeover polls, and a margin.
HANDOVER_POLLS = 3
HANDOVER_MARGIN_SECONDS = 1.0


@dataclass
class Runtime:
    settings: Settings
    provider: Provider
    catalog: Catalog
    store: Store
    lease: ControllerLease
    metrics: Metrics
    writer: Writer
    usage: UsageRecorder
    controller: Controller
    reaper: Reaper
    proxy: Proxy
    gateway: OpenAIGateway
    keys: KeyRing
    follower: Follower
    launches: LaunchRequests
    on_lease_lost: Callable[[], None] = stop_this_process
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _lease_task: asyncio.Task[None] | None = None
    acted: bool = False  # this process held the lease and ran the control loop

    @classmethod
    def build(
        cls,
        settings: Settings,
        provider: Provider | None = None,
        clock: Clock = system_clock,
        on_lease_lost: Callable[[], None] = stop_this_process,
        new_id: Callable[[], str] = new_deployment_id,
        db_executor: Executor | None = None,
    ) -> Runtime:
        catalog = Catalog(
            load_reference(settings.model_reference), allow_unlisted=settings.allow_unlisted_models
        )
        store = Store(settings.resolved_database_url)
        store.prepare(upgrade_allowed=settings.upgrade_database_on_start)
        provider = provider or build_provider(settings)
        lease = ControllerLease(store, clock, seconds=settings.controller_lease_seconds)
        writer = Writer(db_executor)  # database writes that need not hold the loop go through it
        metrics = Metrics()
        activity = Activity()
        usage = usage_recorder(settings, store, metrics, writer)
        ctx = ControlContext(
            settings=settings,
            provider=FencedProvider(provider, lambda: lease.held),  # only the lease holder acts
            store=store,
            clock=clock,
            activity=activity,
            catalog=catalog,
            ledger=Ledger(
                store,
                price_book(settings, provider.name),
                provider=provider.name,
                writer=writer,
                acting=lambda: lease.held,  # a stalled or fenced gateway writes nothing
            ),
            metrics=metrics,
            writer=writer,
            new_id=new_id,
            instance_id=store.instance_id(),
            secret=gateway_secret(settings),
            acting=lambda: lease.held,
        )
        controller = Controller(ctx)
        keys = KeyRing(store, writer, clock, enabled=settings.keys_required)
        follower = Follower(
            settings=settings,
            store=store,
            writer=writer,
            clock=clock,
            activity=activity,
            gateway_id=lease.holder,
            engine_key=ctx.engine_key,
            cold_start_timeout=ctx.cold_start_timeout_seconds,
        )
        proxy = Proxy(
            settings.upstream_timeout_seconds,
            activity,
            usage,
            clock,
            metrics,
            on_engine_error=engine_errors(controller, follower),
            keys=keys,
        )
        return cls(
            settings=settings,
            provider=provider,
            catalog=catalog,
            store=store,
            lease=lease,
            metrics=metrics,
            writer=writer,
            usage=usage,
            controller=controller,
            reaper=Reaper(controller, usage, settings),
            proxy=proxy,
            gateway=OpenAIGateway(
                settings=settings,
                catalog=catalog,
                controller=controller,
                proxy=proxy,
                keys=keys,
                follower=follower,
            ),
            keys=keys,
            follower=follower,
            launches=LaunchRequests(controller),
            on_lease_lost=on_lease_lost,
        )

    async def start(self) -> None:
        """Serve at once; act (reconcile, control loop) now if this process gets the lease,
        else follow the holder until it does."""
        self.keys.load()  # before the first request; then refreshed at the reaper's interval
        self._spawn(self.keys.run(self.settings.reaper_interval_seconds), "key cache")
        self._spawn(watch_loop_lag(self.metrics.loop_lag), "loop lag")
        flush = self.settings.usage.flush_seconds
        self._spawn(self.usage.run(flush, self.controller.clock), "usage flush")
        if listens(self.settings.resolved_database_url):
            handlers = {DEPLOYMENTS_CHANNEL: self.follower.wake, REPORTS_CHANNEL: self.launches.wake}
            self._spawn(Listener(self.settings.resolved_database_url, handlers).run(), "fleet notify")
        if await self.lease.try_once():
            self.follower.active = False
            await self._act()
        else:
            log.warning("another gateway holds the controller lease: serving as a follower")
            self._spawn(self.follower.run_refresh(), "fleet routes")
            self._spawn(self.follower.run_reports(), "fleet reports")
            await self.follower.refresh()  # routes before the first request
            self._spawn(self._follow(), "follower")
        freeze_startup_objects()
        if not self.settings.keys_required:
            log.warning(
                "client_auth is open: anyone who reaches %s:%d may use and start every model",
                self.settings.host,
                self.settings.port,
            )

    async def _follow(self) -> None:
        """Until this process holds the lease; then it acts, and the controller routes."""
        await self.lease.acquire(self.settings.fleet.takeover_poll_seconds)
        log.warning("controller lease taken over: this gateway now acts")
        await self._act()

    async def _act(self) -> None:
        """Reconcile, then run the control loop (this process holds the lease)."""
        self.acted = True
        self._lease_task = asyncio.create_task(self.lease.keep(self._lease_lost), name="controller lease")
        catalog, store = self.catalog, self.store
        catalog.load_overrides(await asyncio.to_thread(store.overrides))
        records = [
            {"id": s.id, "gpus_per_replica": s.gpus_per_replica, "priority": s.priority, "kind": s.kind}
            for s in catalog.specs.values()
        ]
        await self.writer.run(store.upsert_models, records)  # off the loop: the lease keeps renewing
        await self._check_failsafe()
        await reconcile(self.controller, catalog, unknown=self.settings.reconcile_unknown)
        if self.lease.lost:  # while reconciling: this process is stopping (on_lease_lost)
            return
        # The controller routes from here on (a follower's waiters admitted so far are still
        # served by it); not earlier: a start during the reconcile would be taken for a stale one.
        self.follower.active = False
        # Series that exist from the start: Prometheus' increase() ignores a series' first sample.
        self.metrics.known(known_models(catalog, store, self.settings.metrics_known_models))
        self._tasks.append(self.reaper.start())
        self._spawn(self.launches.run(), "fleet launch requests")
        log.info("gateway ready: %d models, provider %s", len(catalog.specs), self.provider.name)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _check_failsafe(self) -> None:
        """Engines a dead gateway leaves must end by themselves (SkyPilot's autodown): checked,
        and re-armed where off, before anything else touches them."""
        controller = self.controller
        try:
            async with asyncio.timeout(self.settings.provider_call_timeout_seconds):
                lines = await controller.provider.check_failsafe(controller.ctx.instance_id)
        except Exception as exc:
            log.error("failsafe check failed: %s", exc)
            lines = [f"failsafe check failed: {exc}"]
        for line in lines:
            self.store.record_event(kind="failsafe", message=line, at=controller.clock())

    def _lease_lost(self) -> None:
        self.controller.abandon()  # stop acting at once; the new holder adopts the engines
        self.on_lease_lost()

    async def _drain_ledger(self) -> None:
        """The ledger's last writes (stops of the shutdown), retried a few times through
        database errors before the writer closes."""
        for _ in range(LEDGER_DRAIN_TRIES):
            if await self.controller.ctx.ledger.drain():
                return
            await asyncio.sleep(1.0)
        log.error("ledger: %d writes not written at shutdown", self.controller.ctx.ledger.pending)

    async def stop(self) -> None:
        """Each step runs whatever the one before it did: one failure skips nothing. A gateway
        that never acted stops no engine (they are the holder's); the holder hands them over
        while another gateway of the fleet lives (`_hand_over`), else stops them."""
        loop_tasks = self._tasks
        for task in loop_tasks:
            task.cancel()
        await asyncio.gather(*loop_tasks, return_exceptions=True)
        # Nobody reads the other gateways' reports any more: their counts must not hold up
        # the drains of the shutdown.
        self.controller.activity.set_remote({}, {}, {}, {})
        if self.acted:
            followers = await self._live_followers()
            if followers:
                await _guarded(lambda: self._hand_over(followers))
            else:
                await _guarded(self.controller.shutdown)
        self.controller.closing = True
        await _guarded(self.reaper.settle)
        await self._stop_keeping_lease()
        for step in (
            self._drain_ledger,
            self.lease.release,
            self.controller.flush_activity,
            self.usage.flush,
            self.follower.close,
            self.proxy.close,
            self.provider.close,
            self.writer.close,
        ):
            await _guarded(step)
        self.store.close()
        gc.unfreeze()  # collectable again (a process that builds another gateway, e.g. the tests)
        log.info("gateway stopped")

    async def _live_followers(self) -> list[str]:
        """The other gateways seen alive lately (their reports), while this process acts."""
        if not self.lease.held:
            return []
        fresh = timedelta(seconds=REPORT_LIFETIMES * self.settings.fleet.report_seconds)
        since = self.controller.clock() - fresh
        try:
            return await asyncio.to_thread(self.store.live_gateways, since, exclude=self.lease.holder)
        except Exception as exc:  # the database refuses: stop the engines, as a lone gateway does
            log.warning("fleet: reading the live gateways failed: %s: %s", type(exc).__name__, exc)
            return []

    async def _hand_over(self, followers: list[str]) -> None:
        """Leave the engines running for a live follower: the runners let go (engines, rows and
        open cost intervals untouched), the ledger's last writes go out, the lease is given up;
        the gateway that takes it adopts them through its reconcile, and bills on from the open
        intervals. If none takes it in time, this process takes it back and stops them."""
        handed = await self.controller.hand_over()
        await self._drain_ledger()
        message = f"gateway stopping: {len(handed)} deployments left to the next lease holder"
        await _guarded(lambda: self.writer.run(self.store.record_event, kind="handover", message=message))
        await self._stop_keeping_lease()
        try:
            await asyncio.to_thread(self.lease.hand_off)
        except Exception as exc:  # the row stays ours: taken back below, or taken once it expires
            log.error("controller lease: giving it up failed: %s: %s", type(exc).__name__, exc)
        wait = HANDOVER_POLLS * self.settings.fleet.takeover_poll_seconds + HANDOVER_MARGIN_SECONDS
        taker = await self._taken_over(wait)
        if taker is not None:
            log.warning(
                "handed %d deployments over to gateway %s (engines left running; live: %s)",
                len(handed),
                taker,
                ", ".join(followers),
            )
            return
        log.warning("no gateway took the controller lease within %gs: stopping the engines here", wait)
        if not await self.lease.try_once():
            log.error("another gateway holds the controller lease now: the engines are its")
            return
        self._lease_task = asyncio.create_task(self.lease.keep(self._lease_lost), name="controller lease")
        await reconcile(self.controller, self.catalog, unknown=self.settings.reconcile_unknown)
        await self.controller.shutdown()

    async def _taken_over(self, seconds: float) -> str | None:
        """The gateway that took the lease within `seconds`; None if none did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            try:
                current = await asyncio.to_thread(self.store.lease)
            except Exception:
                current = None
            if current is not None and current.holder != self.lease.holder:
                return current.holder
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(self.settings.fleet.takeover_poll_seconds / 2)

    async def _stop_keeping_lease(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
            self._lease_task = None


def engine_errors(controller: Controller, follower: Follower) -> Callable[[Route, str], None]:
    """Where the proxy reports an engine it could not reach: the holder's controller checks
    its own engines; a follower tells the holder in its next report."""

    def told(route: Route, reason: str) -> None:
        controller.engine_error(route, reason)
        follower.engine_error(route, reason)

    return told


def usage_recorder(settings: Settings, store: Store, metrics: Metrics, writer: Writer) -> UsageRecorder:
    return UsageRecorder(
        store,
        metrics,
        writer,
        raw_rows=settings.usage.raw_rows,
        retention_days=settings.usage.retention_days,
        rollup_retention_days=settings.usage.rollup_retention_days,
    )


def known_models(catalog: Catalog, store: Store, limit: int) -> list[KnownModel]:
    """The models whose series exist from startup (see `Metrics.known`)."""
    specs = list(catalog.specs.values())
    models = [KnownModel(s.id, s.kind, launchable=not s.external) for s in specs]
    if len(models) <= limit:
        return models
    return pick_known(
        models, last_used=store.models_last_used(), priority={s.id: s.priority for s in specs}, limit=limit
    )


def freeze_startup_objects() -> None:
    """What startup built (the catalog of every model, settings, the ORM's metadata, imported
    modules) lives as long as the process: moved out of the collector's reach, so that a full
    collection scans only what came after. With 10,000 models a full collection held the
    event loop for 0.2-0.6 s; the bench's control_plane shows it. (No collection first: one
    would hold the loop as long, and freezing is a constant-time move of the collector's lists.)"""
    gc.freeze()


async def _guarded(step: Callable[[], object]) -> None:
    try:
        result = step()
        if asyncio.iscoroutine(result):
            await result
    except Exception:
        log.exception("shutdown step %s failed; going on", getattr(step, "__qualname__", step))
