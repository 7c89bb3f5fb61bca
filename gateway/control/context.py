"""What every part of the control plane works with, passed as one object."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from gateway.accounting.ledger import Ledger
from gateway.accounting.metrics import Metrics
from gateway.clock import Clock
from gateway.config.reference import Catalog
from gateway.config.settings import Settings
from gateway.control.activity import Activity
from state import Store
from state.writer import Writer
from tasks.provider import ClusterRef, Provider


def new_deployment_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class ControlContext:
    settings: Settings
    provider: Provider
    store: Store
    clock: Clock
    activity: Activity
    catalog: Catalog
    ledger: Ledger
    metrics: Metrics
    writer: Writer  # database writes that need not hold the loop go through it
    new_id: Callable[[], str] = new_deployment_id
    instance_id: str = ""  # this installation's id (kept in the store): the label on its clusters
    secret: bytes = field(default=b"", repr=False)  # engine keys are derived from it
    # Whether this process holds the controller lease right now (decisions wait for it).
    acting: Callable[[], bool] = lambda: True

    @property
    def cold_start_timeout_seconds(self) -> float:
        """Per provider: a cloud cold start (provisioning, setup, weights) takes far longer."""
        if self.provider.name == "skypilot":
            return self.settings.skypilot.cold_start_timeout_seconds
        return self.settings.cold_start_timeout_seconds

    def keyed(self, ref: ClusterRef) -> ClusterRef:
        """A ref read back from the store, with the engine key it is not stored with."""
        return replace(ref, engine_key=self.engine_key(ref.deployment_id))

    def engine_key(self, deployment_id: str) -> str:
        """The engine's API key: derived again from the gateway's secret after a restart, so the
        engines an earlier process started can be adopted."""
        return derive_engine_key(self.secret, deployment_id)


def derive_engine_key(secret: bytes, deployment_id: str) -> str:
    """The key of one deployment's engine (hex): HMAC-SHA256 of its id under the gateway's secret."""
    return hmac.new(secret, deployment_id.encode(), hashlib.sha256).hexdigest()


def gateway_secret(settings: Settings) -> bytes:
    """The secret engine keys derive from: `engine_secret`, else the admin token."""
    chosen = settings.engine_secret or settings.admin_token
    return chosen.get_secret_value().encode() if chosen is not None else b""
