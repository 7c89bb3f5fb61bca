"""The per-request key check, from memory only: key by hash, model globs, rate limits and the
month's spend against the budget. `refresh()` rebuilds the cache from the store (in the
database writer's thread) and is run every `reaper_interval_seconds` by `run()`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from gateway.accounting.attribution import month_spend
from gateway.api.errors import insufficient_quota, invalid_api_key, model_not_found, rate_limited
from gateway.auth.keys import ClientKey, client_key, hash_key
from gateway.auth.limits import SlidingWindow
from gateway.clock import Clock
from state import ApiKey, Store
from state.writer import Writer

log = logging.getLogger(__name__)

_BEARER = "bearer "


class KeyRing:
    def __init__(self, store: Store, writer: Writer, clock: Clock, *, enabled: bool) -> None:
        self.store = store
        self.writer = writer
        self.clock = clock
        self.enabled = enabled  # client_auth: keys
        self._by_hash: dict[str, ClientKey] = {}
        self.by_id: dict[str, ClientKey] = {}
        self.spent: dict[str, float] = {}  # dollars this UTC month, by key id
        self._requests: dict[str, SlidingWindow] = {}
        self._tokens: dict[str, SlidingWindow] = {}

    # -- the cache --------------------------------------------------------------------------

    def install(self, rows: Iterable[ApiKey]) -> None:
        keys = [(row.key_hash, client_key(row)) for row in rows]
        self._by_hash = dict(keys)
        self.by_id = {key.id: key for _, key in keys}

    def load(self) -> None:
        """Fill the cache before the first request (at startup, on the loop)."""
        self.install(self.store.api_keys())
        if self._budgeted():
            self.spent = month_spend(self.store, self.clock())

    async def refresh(self) -> None:
        self.install(await self.writer.run(self.store.api_keys))
        if self._budgeted():
            self.spent = await self.writer.run(month_spend, self.store, self.clock())

    async def run(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # the previous cache stays; the next refresh tries again
                log.error("key cache refresh failed: %s: %s", type(exc).__name__, exc)

    def _budgeted(self) -> bool:
        return any(k.monthly_budget is not None for k in self.by_id.values())

    # -- per request (microseconds: dict lookups, one SHA-256) --------------------------------

    def authenticate(self, authorization: str | None) -> ClientKey | None:
        """The request's key (None with client_auth open); 401 `invalid_api_key` otherwise."""
        if not self.enabled:
            return None
        if authorization is None or not authorization[:7].lower() == _BEARER:
            raise invalid_api_key("Missing API key: send it as `Authorization: Bearer <key>`.")
        key = self._by_hash.get(hash_key(authorization[7:].strip()))
        if key is None:
            raise invalid_api_key("Incorrect API key provided.")
        if key.revoked:
            raise invalid_api_key(f"The API key {key.id} has been revoked.")
        if key.expires_at is not None and self.clock() >= key.expires_at:
            raise invalid_api_key(f"The API key {key.id} has expired.")
        return key

    def admit(self, key: ClientKey, model: str) -> None:
        """404 for a model outside the key's list, 429 past a limit or the budget; else the
        request is counted against the key's requests per minute."""
        if not key.allows(model):
            raise model_not_found(model)
        now = time.monotonic()
        if key.requests_per_minute is not None:
            window = self._requests.get(key.id) or self._requests.setdefault(key.id, SlidingWindow())
            wait = window.retry_after(now, key.requests_per_minute)
            if wait:
                raise rate_limited(
                    f"Rate limit reached for key {key.id}: {key.requests_per_minute} requests per minute.",
                    unit="requests",
                    retry_after=wait,
                )
        if key.tokens_per_minute is not None and key.id in self._tokens:
            wait = self._tokens[key.id].retry_after(now, key.tokens_per_minute)
            if wait:
                raise rate_limited(
                    f"Rate limit reached for key {key.id}: {key.tokens_per_minute} tokens per minute.",
                    unit="tokens",
                    retry_after=wait,
                )
        if key.monthly_budget is not None and self.spent.get(key.id, 0.0) >= key.monthly_budget:
            raise insufficient_quota(
                f"The API key {key.id} has used its monthly budget of ${key.monthly_budget:.2f}."
            )
        if key.requests_per_minute is not None:
            self._requests[key.id].add(now)

    def wants_tokens(self, key_id: str | None) -> bool:
        """Whether finished requests of this key must report their tokens at once."""
        key = self.by_id.get(key_id) if key_id is not None else None
        return key is not None and key.tokens_per_minute is not None

    def used_tokens(self, key_id: str, tokens: int) -> None:
        window = self._tokens.get(key_id)
        if window is None:
            window = self._tokens[key_id] = SlidingWindow()
        window.add(time.monotonic(), tokens)
