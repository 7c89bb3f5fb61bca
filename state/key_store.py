"""Client API keys in the store, and who started each deployment (for cost attribution).

A mixin of `Store` (it uses `self.engine`). Keys are read whole by the gateway's key cache at
each refresh (a few hundred rows at most); nothing here is read per request.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from state.tables import ApiKey, Deployment


class KeyStore:
    engine: Engine

    def add_key(self, key: ApiKey) -> ApiKey:
        with Session(self.engine) as s:
            s.add(key)
            s.commit()
            s.refresh(key)
        return key

    def api_keys(self) -> list[ApiKey]:
        """Every key, revoked and expired ones included, oldest first."""
        with Session(self.engine) as s:
            return list(s.exec(select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.id))))

    def get_key(self, key_id: str) -> ApiKey | None:
        with Session(self.engine) as s:
            return s.get(ApiKey, key_id)

    def revoke_key(self, key_id: str, at: datetime) -> bool:
        """Revoke a key (kept, for its usage and costs); False if unknown or revoked already."""
        q = (
            update(ApiKey)
            .where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None))
            .values(revoked_at=at)
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(q).rowcount)

    def started_by(self, deployment_ids: Collection[str]) -> dict[str, str | None]:
        """Who started each of these deployments (see `Deployment.started_by`)."""
        if not deployment_ids:
            return {}
        q = select(Deployment.id, Deployment.started_by).where(col(Deployment.id).in_(list(deployment_ids)))
        with Session(self.engine) as s:
            return dict(s.exec(q).all())
