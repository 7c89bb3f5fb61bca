"""Orphans: clusters of this installation that no runner owns, found by the provider's list.

A gateway that dies mid-launch, before it records its cluster, leaves one behind when the next
process's reconcile cannot list the provider's clusters: the deployment is closed ("no engine
found") and the cluster runs on, unowned, until the provider's failsafe (if any) deletes it. The
control loop sweeps for them every `orphan_sweep_seconds` (`Reaper`), and the shutdown stops what
is left. A cluster is owned while a runner holds it (`ref.name`: takeovers and spare swaps move
a cluster to another deployment, its labels keep the first one's id) or its deployment has a
runner (a launch in progress holds no ref yet); the sweep touches nothing else.

A stopped orphan of a deployment whose row ended is billed to that row up to its stop (its
launch's cold time, which reconcile closed when a gateway last saw it) and recorded as an event
`orphan-stopped`; the row's state is left as it is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from state import TERMINAL, DeploymentState
from tasks.provider import ClusterInfo

if TYPE_CHECKING:
    from gateway.control.controller import Controller

log = logging.getLogger(__name__)


async def unowned(controller: Controller, what: str) -> list[ClusterInfo] | None:
    """This installation's clusters that no runner owns; None if the provider cannot say."""
    try:
        async with asyncio.timeout(controller.settings.provider_call_timeout_seconds):
            infos = await controller.provider.list(controller.ctx.instance_id)
    except Exception as exc:
        log.error("%s: cannot list the provider's engines: %s", what, exc)
        return None
    held = controller.held_clusters()  # once: 1,000 clusters against 1,000 runners
    return [info for info in infos if not controller.owns(info.ref, held)]


async def sweep(controller: Controller, *, at_shutdown: bool = False) -> list[str]:
    """Stop the clusters nobody owns (in parallel); the names of those stopped. The periodic
    sweep leaves a cluster whose deployment row is still live to that row's reconcile; the
    shutdown's stops whatever is left."""
    what = "shutdown" if at_shutdown else "orphan sweep"
    found = await unowned(controller, what)
    if not found:
        return []
    stopped = await asyncio.gather(*(_stop(controller, info, what, at_shutdown) for info in found))
    return [info.ref.name for info, done in zip(found, stopped, strict=True) if done]


async def _stop(controller: Controller, info: ClusterInfo, what: str, at_shutdown: bool) -> bool:
    ref, store, writer = info.ref, controller.store, controller.ctx.writer
    try:
        dep = await writer.run(store.get_deployment, ref.deployment_id) if ref.deployment_id else None
    except Exception as exc:  # the database refuses: the next sweep sees it again
        if not at_shutdown:
            log.error("%s: cannot read the deployment of %s: %s", what, ref.name, exc)
            return False
        dep = None
    live = dep is not None and DeploymentState(dep.state) not in TERMINAL
    if not at_shutdown and (live or controller.owns(ref) or not controller.ctx.acting()):
        return False  # a runner took it meanwhile, or its row is still someone's to end
    try:
        async with asyncio.timeout(controller.settings.stop_timeout_seconds):
            await controller.provider.stop(ref)
    except Exception as exc:
        log.error("%s: stopping %s failed: %s", what, ref.name, exc)
        return False
    now = controller.clock()
    owner = f"deployment {dep.id} ({dep.model}, {dep.state})" if dep is not None else "no deployment"
    message = f"{ref.name} ({info.status}) ran with no owner, {owner}: stopped"
    try:
        if dep is not None and not live:
            await writer.run(store.bill_orphan, dep.id, ref.name, until=now)
        await writer.run(
            store.record_event,
            kind="orphan-stopped",
            model=dep.model if dep is not None else info.model,
            deployment_id=dep.id if dep is not None else None,
            message=message,
            at=now,
        )
    except Exception as exc:  # the database refuses: the stop stands, its record is lost
        log.error("%s: %s, but not recorded: %s", what, message, exc)
    log.warning("%s: %s", what, message)
    return True
