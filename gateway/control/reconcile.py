"""Reconcile at startup: what the store says an earlier gateway process held vs what the
provider has running now.

- a deployment whose engine is still there: adopted when healthy and the provider adopts
  (SkyPilot clusters), else stopped; a spare is stopped (its spare time is not resumed: it is
  an optimisation, and a stop is the safe end);
- a deployment whose engine vanished: marked stopped;
- an engine carrying our label that the store does not know (SkyPilot): downed, or adopted
  when `reconcile_unknown` is `adopt` and its model is in the reference file.
Each decision is an event of kind `reconciled` saying what was found and done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from gateway.config.reference import Catalog
from gateway.control.controller import Controller
from gateway.control.fleet import ref_from_json
from gateway.control.runner import StopRequest
from state import Deployment, DeploymentState
from tasks.provider import ClusterInfo, ClusterRef, Endpoint
from tasks.sky_task import model_slug

log = logging.getLogger(__name__)


# Tries of the provider's list before reconcile goes on without it.
LIST_TRIES = 3
LIST_RETRY_SECONDS = 2.0
# A store write refused by the database (busy, locked) is retried after 1, 2, 4 … seconds.
STORE_RETRY_MAX_SECONDS = 8.0

T = TypeVar("T")


class _LeaseLost(Exception):
    """The lease went while the reconcile waited for the database: the new holder reconciles."""


async def reconcile(controller: Controller, catalog: Catalog, *, unknown: str = "down") -> None:
    try:
        await _reconcile(controller, catalog, unknown)
    except _LeaseLost:
        log.error("reconcile: the controller lease was lost; left to the new holder")


async def _reconcile(controller: Controller, catalog: Catalog, unknown: str) -> None:
    listed = await _list(controller)
    by_deployment = {info.ref.deployment_id: info for info in (listed or {}).values()}
    for dep in await _stored(controller, controller.store.live_deployments):
        ref = ref_from_json(dep.handle)
        if ref is None and dep.id in by_deployment:  # launched, but the gateway died before recording it
            ref = by_deployment[dep.id].ref
        if ref is None or ref.provider != controller.provider.name:
            # No cluster is recorded or listed for it (a launch that found no capacity, say,
            # whose gateway could not write that down): billed only while a gateway saw it. If
            # the list failed and its launch did make a cluster, the orphan sweep stops that and
            # bills it to this row up to then (orphans.py).
            await _close_stale(
                controller,
                dep,
                f"left {dep.state} by an earlier gateway process; no engine found",
                partial(_last_checked, controller, dep),
            )
            continue
        found = _take(listed, ref) if listed is not None else None
        await _known_engine(controller, catalog, dep, ref, vanished=listed is not None and found is None)
    for info in (listed or {}).values():
        await _unknown_engine(controller, catalog, info, unknown)


def _take(listed: dict[str, ClusterInfo], ref: ClusterRef) -> ClusterInfo | None:
    """Remove the listed engine of a stored ref (by name, or by deployment: a provider may
    name an engine it found after a restart differently)."""
    found = listed.pop(ref.name, None)
    for name in [n for n, info in listed.items() if info.ref.deployment_id == ref.deployment_id]:
        found = found or listed[name]
        del listed[name]
    return found


async def _stored(controller: Controller, step: Callable[[], T]) -> T:
    """A store step of the reconcile, retried through database errors while this process holds
    the lease: a busy database must not abort the startup (the gateway would exit holding it)."""
    tries = 0
    while True:
        try:
            return step()
        except SQLAlchemyError as exc:
            if not controller.ctx.acting():
                raise _LeaseLost from exc
            tries += 1
            log.warning("reconcile: database error (try %d), retried: %s", tries, exc)
            await asyncio.sleep(min(2.0 ** (tries - 1), STORE_RETRY_MAX_SECONDS))


async def _close_stale(
    controller: Controller, dep: Deployment, message: str, cost_until: Callable[[], datetime | None]
) -> None:
    """`close_stale`, retried as a whole: its compare-and-swaps make a second run finish what
    the first left."""
    await _stored(controller, lambda: controller.close_stale(dep, message, cost_until=cost_until()))


def _now() -> None:
    """The cost ends now (close_stale's default): the engine was stopped just now."""


async def _list(controller: Controller) -> dict[str, ClusterInfo] | None:
    """The provider's engines by name; None if it cannot say (then nothing is taken as vanished)."""
    timeout = controller.settings.provider_call_timeout_seconds
    for attempt in range(LIST_TRIES):
        try:
            async with asyncio.timeout(timeout):
                return {
                    info.ref.name: info for info in await controller.provider.list(controller.ctx.instance_id)
                }
        except Exception as exc:
            log.error("reconcile: cannot list the provider's engines (try %d): %s", attempt + 1, exc)
            await asyncio.sleep(LIST_RETRY_SECONDS)
    return None


async def _known_engine(
    controller: Controller, catalog: Catalog, dep: Deployment, ref: ClusterRef, *, vanished: bool
) -> None:
    provider = controller.provider
    spec = catalog.resolve(dep.model)
    if provider.adopt_on_restart and spec is not None and dep.state in _ADOPTABLE and not vanished:
        ref = controller.ctx.keyed(ref)
        endpoint = await _probe(controller, ref)
        if endpoint is not None or await _still_loading(controller, dep, ref):
            # A runner owns it from here: it serves at once, or waits for it to finish loading
            # within the cold-start timeout (and stops it if it never becomes ready).
            state = "healthy" if endpoint is not None else "loading"
            controller.adopt(
                dep, spec, ref, endpoint, reason=f"adopted {state} {ref.name} after a gateway restart"
            )
            return
    if provider.adopt_on_restart and vanished:
        await _close_stale(
            controller,
            dep,
            f"left {dep.state} by an earlier gateway process; {ref.name} vanished",
            lambda: _vanished_at(controller, dep),
        )
        return
    message = f"left {dep.state} by an earlier gateway process"
    try:
        async with asyncio.timeout(controller.settings.stop_timeout_seconds):
            await provider.stop(ref)
    except Exception as exc:
        if spec is None:
            await _close_stale(controller, dep, f"{message}; stopping {ref.name} failed: {exc}", _now)
            return
        # A runner owns it and keeps trying to stop it.
        runner = controller.adopt(
            dep, spec, ref, None, reason=f"{message}; stopping {ref.name} failed: {exc}"
        )
        runner.request_stop(StopRequest("reconciled", f"{message}; stop retried", drain=False))
        return
    await _close_stale(controller, dep, f"{message}; {ref.name} was stopped", _now)


async def _still_loading(controller: Controller, dep: Deployment, ref: ClusterRef) -> bool:
    """A deployment left loading whose engine still starts (audit B6): its cold start is not
    thrown away. When the provider cannot tell, it is given the benefit of the doubt: the
    runner's cold-start timeout bounds the wait."""
    if dep.state != DeploymentState.LOADING.value:
        return False
    try:
        async with asyncio.timeout(controller.settings.provider_call_timeout_seconds):
            return await controller.provider.probe_loading(ref) != "dead"
    except Exception:
        return True


async def _probe(controller: Controller, ref: ClusterRef) -> Endpoint | None:
    try:
        async with asyncio.timeout(controller.settings.provider_call_timeout_seconds):
            return await controller.provider.probe(ref)
    except Exception:
        return None


def _vanished_at(controller: Controller, dep: Deployment) -> datetime:
    """When a cluster that vanished while no gateway watched stopped billing, at the latest: the
    failsafe deletes it 3 heartbeat intervals after the last heartbeat, which is no earlier
    than the last time the ledger saw it open. One whose stop had begun is taken to have ended
    when it was asked to (what the stop itself took is not known)."""
    now = controller.clock()
    if dep.state == DeploymentState.STOPPING.value and dep.stopping_at is not None:
        return min(now, dep.stopping_at)
    interval = controller.provider.heartbeat_interval_seconds
    checked = _last_checked(controller, dep)
    if checked is None or interval is None:
        return now
    return min(now, checked + timedelta(seconds=3 * interval))


def _last_checked(controller: Controller, dep: Deployment) -> datetime | None:
    """The last time a gateway saw the deployment's cost interval open (None: no open one)."""
    checked = [i.checked_at for i in controller.store.open_intervals() if i.deployment_id == dep.id]
    return checked[0] if checked else None


_ADOPTABLE = frozenset({DeploymentState.LOADING.value, DeploymentState.READY.value})


async def _unknown_engine(controller: Controller, catalog: Catalog, info: ClusterInfo, unknown: str) -> None:
    provider, store = controller.provider, controller.store
    slug = info.ref.data.get("model_slug")
    spec = next((s for s in catalog.specs.values() if not s.external and model_slug(s.id) == slug), None)
    if unknown == "adopt" and spec is not None and controller.route(spec.id) is None:
        endpoint = await _probe(controller, info.ref)
        if endpoint is not None:
            dep_id = info.ref.deployment_id or info.ref.name[-12:]
            if store.get_deployment(dep_id) is not None:  # a row that ended (e.g. failed): a new id
                dep_id = controller.ctx.new_id()
            dep = store.create_deployment(
                deployment_id=dep_id,
                model=spec.id,
                provider=provider.name,
                gpus=spec.gpus_per_replica,
                at=controller.clock(),
            )
            store.transition(dep.id, expected=DeploymentState.PENDING, new=DeploymentState.LAUNCHING)
            ref = ClusterRef(
                provider=provider.name,
                name=info.ref.name,
                deployment_id=dep.id,
                gpus=info.ref.gpus or spec.gpus_per_replica,
                data=dict(info.ref.data),
            )
            dep = store.get_deployment(dep.id) or dep
            controller.adopt(dep, spec, ref, endpoint, reason=f"adopted unknown cluster {info.ref.name}")
            return
    try:
        async with asyncio.timeout(controller.settings.stop_timeout_seconds):
            await provider.stop(info.ref)
        message = f"{info.ref.name} ({info.status}) carries our label but no deployment: downed"
    except Exception as exc:
        message = f"{info.ref.name} carries our label but no deployment; down failed: {exc}"
    store.record_event(
        kind="reconciled", model=spec.id if spec else None, message=message, at=controller.clock()
    )
    log.warning("reconcile: %s", message)
