"""What route functions need, as `Annotated` dependencies read from `app.state` (set once by
`create_app`), and the admin bearer-token check."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.errors import GatewayError, unavailable
from gateway.config.reference import Catalog
from gateway.config.settings import Settings
from gateway.control.controller import Controller
from state import Store


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


def get_controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def require_acting(request: Request) -> None:
    """Admin calls that act on models only on the controller-lease holder: another gateway of
    the fleet serves requests but starts and stops nothing itself. Async: the lease is read on
    the event loop (a sync dependency runs in a thread)."""
    controller: Controller = request.app.state.controller
    if not controller.ctx.acting():
        raise unavailable(
            "This gateway does not hold the controller lease (another gateway of the fleet does): "
            "send this call to the lease holder.",
            code="not_lease_holder",
            retry_after=5,
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
ControllerDep = Annotated[Controller, Depends(get_controller)]
StoreDep = Annotated[Store, Depends(get_store)]

# The security scheme Swagger's Authorize button fills in; missing credentials are our 401.
bearer = HTTPBearer(auto_error=False, description="The gateway's `admin_token`.")


def require_admin_token(settings: Settings) -> None:
    """Refuse to build an app whose admin API nobody could use."""
    if settings.admin_token is None:
        raise ValueError("admin_token is required (use `llm-gateway serve --dev` to generate one)")


def _same_secret(given: str, expected: str) -> bool:
    """Constant time, also in the length: compare digests, not the strings."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given.encode()).digest(), digest(expected.encode()).digest())


def require_admin(
    settings: SettingsDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    token = settings.admin_token
    if creds is None or token is None or not _same_secret(creds.credentials, token.get_secret_value()):
        raise GatewayError(
            401,
            "A valid admin bearer token is required.",
            type="authentication_error",
            code="invalid_admin_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
