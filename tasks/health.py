"""Readiness probe: poll an engine's /health until it answers 200, then check that its
/v1/models names the model (after a swap, the old engine may still answer /health)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

# vLLM answers /health within milliseconds once up; poll often so the gateway routes to it
# as soon as possible after it turns healthy (the issue asks for at most 250 ms).
HEALTH_POLL_SECONDS = 0.1
HEALTH_REQUEST_TIMEOUT_SECONDS = 2.0


async def serves(client: httpx.AsyncClient, base_url: str, model: str, key: str) -> bool:
    """True if GET /v1/models (with the engine key) lists `model`."""
    try:
        response = await client.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        if response.status_code != 200:
            return False
        return any(entry.get("id") == model for entry in response.json().get("data", []))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


async def wait_healthy(
    base_url: str,
    *,
    model: str,
    key: str,
    alive: Callable[[], None] | None = None,
    poll_seconds: float = HEALTH_POLL_SECONDS,
) -> None:
    """Return when GET {base_url}/health is 200 and /v1/models lists `model`. `alive()` is
    called each round and may raise (e.g. when the engine process has exited) to stop waiting.
    Unbounded: wrap in a timeout."""
    async with httpx.AsyncClient(timeout=HEALTH_REQUEST_TIMEOUT_SECONDS) as client:
        while True:
            if alive is not None:
                alive()
            try:
                response = await client.get(f"{base_url}/health")
                if response.status_code == 200 and await serves(client, base_url, model, key):
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(poll_seconds)


async def is_healthy(base_url: str) -> bool:
    async with httpx.AsyncClient(timeout=HEALTH_REQUEST_TIMEOUT_SECONDS) as client:
        try:
            return (await client.get(f"{base_url}/health")).status_code == 200
        except httpx.HTTPError:
            return False
