"""Persistent state: SQLModel tables and the store. Imports nothing from `gateway` or `tasks`."""

from state.machine import ALLOWED, TERMINAL, DeploymentState, InvalidTransition
from state.store import Store
from state.tables import ApiKey, CostInterval, Deployment, Event, ModelRecord, Usage

__all__ = [
    "ALLOWED",
    "TERMINAL",
    "ApiKey",
    "CostInterval",
    "Deployment",
    "DeploymentState",
    "Event",
    "InvalidTransition",
    "ModelRecord",
    "Store",
    "Usage",
]
