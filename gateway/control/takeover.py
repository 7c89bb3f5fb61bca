"""Capacity takeover: a model that finds no GPUs moves onto a lower-priority model's cluster;
and spares: a cold start that fits a spare cluster swaps onto it instead of launching.

The policies (`choose_victim`, `choose_spare`) are pure; this module applies them. The victim's runner is *asked* to
drain and hand its cluster over; the requester owns the cluster from the moment it is handed
over, so a swap that fails, or a requester that is cancelled, stops it in the requester's own
`finally` — no path leaves the cluster without an owner. A spare is handed over the same way,
only without a drain (it serves nothing).
"""

from __future__ import annotations

import logging
from datetime import datetime

from gateway.control.context import ControlContext
from gateway.control.policies import DeploymentView, Eviction, Request, choose_spare, choose_victim
from gateway.control.runner import DeploymentRunner
from tasks.provider import CapacityError, ClusterRef

log = logging.getLogger(__name__)


class Takeover:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self._evictions: list[Eviction] = []  # remembered for the cooldown against thrash

    async def take_over(
        self,
        requester: DeploymentRunner,
        exc: CapacityError,
        candidates: list[tuple[DeploymentRunner, DeploymentView]],
    ) -> ClusterRef:
        """Swap `requester` onto a victim's cluster, or re-raise `exc` when there is none."""
        spec = self.ctx.catalog.resolve(requester.model) or requester.spec
        serving = {view.deployment_id: runner for runner, view in candidates if runner.serving}
        now = self.ctx.clock()
        victim_view = choose_victim(
            [view for _, view in candidates if view.deployment_id in serving],
            Request(
                model=spec.id,
                priority=spec.priority,
                gpus=spec.gpus_per_replica,
                accelerators=spec.accelerators or (),
                extra=any(r.serving and r.model == spec.id for r, _ in candidates),
            ),
            evictions=self._evictions,
            now=now,
            cooldown_seconds=self.ctx.settings.eviction_cooldown_seconds,
        )
        if victim_view is None:
            raise exc
        victim = serving[victim_view.deployment_id]
        log.info("%s takes over %s's cluster (%s)", spec.id, victim.model, exc)
        ref = await victim.hand_over(requester)  # the requester owns `ref` from here on
        self._remember(victim.model, spec.id, now)
        return await self._swap(
            requester,
            ref,
            "takeover",
            f"took over {ref.name} from {victim.model} (priority {victim_view.priority})",
        )

    async def claim_spare(
        self, requester: DeploymentRunner, candidates: list[tuple[DeploymentRunner, DeploymentView]]
    ) -> ClusterRef | None:
        """Swap `requester` onto a spare that fits it (the provider says which do); None when
        there is none, or the chosen one stopped before it could hand over (then it launches)."""
        provider = self.ctx.provider
        fitting = {
            view.deployment_id: runner
            for runner, view in candidates
            if runner.claimable
            and runner.ref is not None
            and provider.fits(runner.ref, requester.launch_spec)
        }
        chosen = choose_spare([v for _, v in candidates if v.deployment_id in fitting], requester.model)
        if chosen is None:
            return None
        spare = fitting[chosen.deployment_id]
        try:
            ref = await spare.hand_over(requester)  # the requester owns `ref` from here on
        except CapacityError as exc:
            log.info(
                "%s: spare %s not handed over (%s); launching", requester.model, chosen.deployment_id, exc
            )
            return None
        log.info("%s swaps onto the spare %s of %s", requester.model, ref.name, spare.model)
        return await self._swap(
            requester,
            ref,
            "spare-swap",
            f"swapped onto the spare {ref.name} of {spare.model} instead of launching",
        )

    async def _swap(
        self, requester: DeploymentRunner, ref: ClusterRef, kind: str, message: str
    ) -> ClusterRef:
        """On a cluster just handed to `requester`: its cost starts now, then the engine is swapped."""
        requester.rehold(ref)
        swapped = await self.ctx.provider.swap(ref, requester.launch_spec)
        await requester.receive_cluster(swapped)
        requester.hold(swapped)  # the swapped ref's price
        self.ctx.writer.submit(
            self.ctx.store.record_event,
            kind=kind,
            model=requester.model,
            deployment_id=requester.id,
            message=message,
            at=self.ctx.clock(),
        )
        return swapped

    def _remember(self, victim: str, by: str, now: datetime) -> None:
        cooldown = self.ctx.settings.eviction_cooldown_seconds
        self._evictions = [e for e in self._evictions if (now - e.at).total_seconds() < cooldown]
        self._evictions.append(Eviction(victim=victim, by=by, at=now))
