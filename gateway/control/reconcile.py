"""Reconcile at startup: what the store says an earlier gateway process held vs what the
provider has running now.

- a deployment whose engine is still there: adopted when healthy and the provider adopts
  (SkyPilot clusters), else stopped;
- a deployment whose engine vanished: marked stopped;
- an engine carrying our label that the store does not know (SkyPilot): downed, or adopted
  when `reconcile_unknown` is `adopt` and its model is in the reference file.
Each decision is an event of kind `reconciled` saying what was found and done.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from gateway.config.reference import Catalog
from gateway.control.controller import Controller
from gateway.control.fleet import ref_from_json
from state import DeploymentState
from tasks.provider import ClusterInfo, ClusterRef, ProviderError
from tasks.sky_task import model_slug

log = logging.getLogger(__name__)


async def reconcile(controller: Controller, catalog: Catalog, *, unknown: str = "down") -> None:
    provider, store = controller.provider, controller.store
    try:
        listed = {info.ref.name: info for info in await provider.list()}
    except ProviderError as exc:
        log.error("reconcile: cannot list the provider's engines: %s", exc)
        listed = {}
    by_deployment = {info.ref.deployment_id: info for info in listed.values()}

    for dep in store.live_deployments():
        ref = ref_from_json(dep.handle)
        if ref is None and dep.id in by_deployment:  # launched, but the gateway died before recording it
            ref = by_deployment[dep.id].ref
        if ref is None or ref.provider != provider.name:
            controller.close_stale(dep, f"left {dep.state} by an earlier gateway process; no engine found")
            continue
        found = listed.pop(ref.name, None)
        spec = catalog.resolve(dep.model)
        if provider.adopt_on_restart and spec is not None and dep.state in _ADOPTABLE:
            endpoint = await provider.probe(ref)
            if endpoint is not None:
                controller.adopt(
                    dep, spec, ref, endpoint, reason=f"adopted healthy {ref.name} after a gateway restart"
                )
                continue
        if provider.adopt_on_restart and found is None:
            controller.close_stale(
                dep,
                f"left {dep.state} by an earlier gateway process; {ref.name} vanished",
                cost_until=_vanished_at(controller, dep.id),
            )
            continue
        message = f"left {dep.state} by an earlier gateway process"
        try:
            await provider.stop(ref)
            message += f"; {ref.name} was stopped"
        except ProviderError as exc:
            message += f"; stopping {ref.name} failed: {exc}"
        controller.close_stale(dep, message)

    for info in listed.values():
        await _unknown_engine(controller, catalog, info, unknown)


def _vanished_at(controller: Controller, deployment_id: str) -> datetime:
    """When a cluster that vanished while no gateway watched stopped billing, at the latest: the
    failsafe deletes it 3 heartbeat intervals after the last heartbeat, which is no earlier
    than the last time the ledger saw it open."""
    now = controller.clock()
    interval = controller.provider.heartbeat_interval_seconds
    checked = [i.checked_at for i in controller.store.open_intervals() if i.deployment_id == deployment_id]
    if not checked or checked[0] is None or interval is None:
        return now
    return min(now, checked[0] + timedelta(seconds=3 * interval))


_ADOPTABLE = frozenset({DeploymentState.LOADING.value, DeploymentState.READY.value})


async def _unknown_engine(controller: Controller, catalog: Catalog, info: ClusterInfo, unknown: str) -> None:
    provider, store = controller.provider, controller.store
    slug = info.ref.data.get("model_slug")
    spec = next((s for s in catalog.specs.values() if not s.external and model_slug(s.id) == slug), None)
    if unknown == "adopt" and spec is not None and spec.id not in controller.routes:
        endpoint = await provider.probe(info.ref)
        if endpoint is not None:
            dep = store.create_deployment(
                deployment_id=info.ref.deployment_id or info.ref.name[-12:],
                model=spec.id,
                provider=provider.name,
                gpus=spec.gpus_per_replica,
                at=controller.clock(),
            )
            ref = ClusterRef(
                provider=provider.name,
                name=info.ref.name,
                deployment_id=dep.id,
                gpus=spec.gpus_per_replica,
                data=dict(info.ref.data),
            )
            controller.adopt(dep, spec, ref, endpoint, reason=f"adopted unknown cluster {info.ref.name}")
            return
    try:
        await provider.stop(info.ref)
        message = f"{info.ref.name} ({info.status}) carries our label but no deployment: downed"
    except ProviderError as exc:
        message = f"{info.ref.name} carries our label but no deployment; down failed: {exc}"
    store.record_event(
        kind="reconciled", model=spec.id if spec else None, message=message, at=controller.clock()
    )
    log.warning("reconcile: %s", message)
