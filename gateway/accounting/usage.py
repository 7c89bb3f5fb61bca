"""Per-request usage, recorded off the hot path: the request only appends to a list; a
background flush parses token counts and writes the rows in one transaction."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.accounting.metrics import Metrics
from state import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    at: datetime
    model: str
    deployment_id: str | None
    path: str
    status: int
    stream: bool
    latency_ms: float
    body: bytes | None = None  # a non-streamed JSON response, parsed for `usage` at flush time
    usage: dict[str, Any] | None = None  # a stream's usage, as the engine reported it


def _tokens(body: bytes | None, usage: dict[str, Any] | None = None) -> tuple[int | None, int | None]:
    if usage is None:
        if not body:
            return None, None
        try:
            usage = json.loads(body).get("usage") or {}
        except (ValueError, AttributeError):
            return None, None
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else None, completion if isinstance(completion, int) else None)


def to_row(rec: UsageRecord) -> dict[str, Any]:
    """The `usage` table row of a record (a plain dict: inserted in bulk)."""
    prompt, completion = _tokens(rec.body, rec.usage)
    return {
        "at": rec.at,
        "model": rec.model,
        "deployment_id": rec.deployment_id,
        "path": rec.path,
        "status": rec.status,
        "stream": rec.stream,
        "latency_ms": round(rec.latency_ms, 3),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }


class UsageRecorder:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._pending: list[UsageRecord] = []

    def record(self, rec: UsageRecord) -> None:
        self._pending.append(rec)

    async def flush(self) -> int:
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        return await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[UsageRecord]) -> int:
        """In a thread: parse token counts, count them, insert the rows."""
        rows = [to_row(rec) for rec in batch]
        for row in rows:
            if row["prompt_tokens"]:
                self.metrics.tokens.labels(model=row["model"], kind="prompt").inc(row["prompt_tokens"])
            if row["completion_tokens"]:
                self.metrics.tokens.labels(model=row["model"], kind="completion").inc(
                    row["completion_tokens"]
                )
        return self.store.add_usage(rows)
