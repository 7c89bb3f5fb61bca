"""Client API keys: made here, stored only as a SHA-256 hash, and checked per request against a
cache in memory (`KeyRing`), so the hot path reads no database.

A key is `sk-gw-` and 43 characters of `secrets.token_urlsafe(32)` (256 bits): a plain SHA-256
is enough for a key of that entropy (no salt or slow hash needed, unlike a password), and
costs about a microsecond. The cache is rebuilt from the store every `reaper_interval_seconds`
(revocations by another gateway or the CLI are seen within that time) and at once after an
admin change made through this gateway.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import translate

from state import ApiKey

KEY_PREFIX = "sk-gw-"


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key-" + secrets.token_hex(6)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ClientKey:
    """What a request's check needs of a key (built from its row at each refresh)."""

    id: str
    name: str
    team: str
    patterns: tuple[str, ...]
    may_wake: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    monthly_budget: float | None
    expires_at: datetime | None
    revoked: bool
    # The globs as one compiled pattern (a match is a fraction of a microsecond; fnmatch per
    # glob and request was most of the check's time).
    _match: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        joined = "|".join(f"(?:{translate(p)})" for p in self.patterns) or r"(?!)"
        object.__setattr__(self, "_match", re.compile(joined))

    def allows(self, model: str) -> bool:
        return self._match.match(model) is not None


def patterns_of(models_json: str) -> tuple[str, ...]:
    try:
        value = json.loads(models_json)
    except ValueError:
        return ()
    return tuple(p for p in value if isinstance(p, str)) if isinstance(value, list) else ()


def client_key(row: ApiKey) -> ClientKey:
    return ClientKey(
        id=row.id,
        name=row.name,
        team=row.team,
        patterns=patterns_of(row.models),
        may_wake=row.may_wake,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        monthly_budget=row.monthly_budget,
        expires_at=row.expires_at,
        revoked=row.revoked_at is not None,
    )
