"""Usage, recorded off the hot path and rolled up per minute.

On the loop, `record()` only adds to in-memory per-minute sums (requests, latency bucket, the
tokens of streams, which the proxy already read) and keeps the body of a non-streamed answer
for later. Every few seconds `flush()` detaches what was gathered and hands it to the database
writer, which reads the token counts out of the bodies (in small slices), counts them in
Prometheus and adds the sums to the `usage_minutes` rows in one transaction. A write that fails
is merged back and written at the next flush: nothing is lost, nothing counted twice.

A day at 3,000 requests/s is 1,440 rows per model, endpoint, status, stream flag and API key,
whatever the rate. Raw per-request rows (`usage.raw_rows`) are optional, kept
`usage.retention_days`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.accounting.metrics import Metrics
from gateway.clock import Clock
from state import Store
from state.tables import LATENCY_BOUNDS_MS, LATENCY_COLUMNS
from state.usage_store import UsageKey
from state.writer import Writer, yield_gil

log = logging.getLogger(__name__)

# Bodies parsed between two yields of the GIL in the writer (each takes a few microseconds).
PARSE_SLICE = 100
# Raw rows inserted per transaction (a short lock, so other writers never wait long).
RAW_INSERT_SLICE = 500
# Raw rows kept for a retry while the database fails; older ones beyond this are dropped.
MAX_PENDING_RAW = 200_000
# How often old rows are pruned, and how many rows one prune transaction deletes.
PRUNE_EVERY = timedelta(hours=1)
PRUNE_SLICE = 10_000

_N_BUCKETS = len(LATENCY_COLUMNS)
# A rollup in memory: [requests, prompt tokens, completion tokens, latency ms sum, *buckets].
_SUMS = 4


@dataclass(frozen=True)
class UsageRecord:
    at: datetime
    model: str
    deployment_id: str | None
    path: str
    status: int
    stream: bool
    latency_ms: float
    body: bytes | None = None  # a non-streamed JSON answer: its `usage` is read at flush time
    usage: dict[str, Any] | None = None  # a stream's usage, as the engine reported it
    api_key_id: str | None = None


@dataclass
class Batch:
    """What one flush writes; owned by the loop until handed over, then by the writer's job."""

    rollups: dict[UsageKey, list[float]] = field(default_factory=dict)
    bodies: list[tuple[UsageKey, bytes, int]] = field(default_factory=list)  # key, body, raw index or -1
    raw: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # model -> [prompt, completion] to count

    def __bool__(self) -> bool:
        return bool(self.rollups or self.raw)

    def merge(self, other: Batch) -> None:
        for key, sums in other.rollups.items():
            mine = self.rollups.get(key)
            if mine is None:
                self.rollups[key] = sums
            else:
                for i, v in enumerate(sums):
                    mine[i] += v
        offset = len(other.raw)
        self.raw[:0] = other.raw  # older rows first
        self.bodies = other.bodies + [(k, b, i + offset if i >= 0 else -1) for k, b, i in self.bodies]
        for model, (p, c) in other.tokens.items():
            _add_tokens(self.tokens, model, p, c)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def tokens_of(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


_DECODER = json.JSONDecoder()
_USAGE_KEY = b'"usage"'
_USAGE_WINDOW = 4096  # bytes after the key that may hold the usage object


def body_tokens(body: bytes) -> tuple[int | None, int | None]:
    """Token counts of a non-streamed answer, from its last `"usage": {...}` member (engines
    write it at the top level, after the choices). Reads at most a few kilobytes of the body,
    whatever its size, so that parsing never holds the GIL for long."""
    at = body.rfind(_USAGE_KEY)
    if at < 0:
        return None, None
    tail = body[at + len(_USAGE_KEY) : at + len(_USAGE_KEY) + _USAGE_WINDOW].decode("utf-8", "replace")
    rest = tail.lstrip()
    if not rest.startswith(":"):
        return None, None
    value = rest[1:].lstrip()
    try:
        usage, _ = _DECODER.raw_decode(value)
    except (ValueError, RecursionError):  # not JSON, cut off, or nested beyond reason
        return None, None
    return tokens_of(usage)


def _add_tokens(into: dict[str, list[int]], model: str, prompt: int | None, completion: int | None) -> None:
    acc = into.get(model)
    if acc is None:
        acc = into[model] = [0, 0]
    acc[0] += prompt or 0
    acc[1] += completion or 0


def raw_row(rec: UsageRecord, prompt: int | None, completion: int | None) -> dict[str, Any]:
    """The `usage` table row of a record (a plain dict: inserted in bulk)."""
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
        "api_key_id": rec.api_key_id,
    }


def minute_row(key: UsageKey, sums: list[float]) -> dict[str, Any]:
    minute, model, path, status, stream, api_key_id = key
    row: dict[str, Any] = {
        "minute": minute,
        "model": model,
        "path": path,
        "status": status,
        "stream": stream,
        "api_key_id": api_key_id,
        "requests": int(sums[0]),
        "prompt_tokens": int(sums[1]),
        "completion_tokens": int(sums[2]),
        "latency_ms_sum": round(sums[3], 3),
    }
    row.update({name: int(n) for name, n in zip(LATENCY_COLUMNS, sums[_SUMS:], strict=True)})
    return row


class UsageRecorder:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        writer: Writer,
        *,
        raw_rows: bool = False,
        retention_days: float | None = 30,
        rollup_retention_days: float | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.writer = writer
        self.raw_rows = raw_rows
        self.retention_days = retention_days
        self.rollup_retention_days = rollup_retention_days
        self._pending = Batch()
        self._written: set[UsageKey] = set()  # keys with a row; used by the writer's jobs only
        self._last_prune: datetime | None = None
        self._minute = self._minute_end = datetime.min.replace(tzinfo=UTC)  # the current minute
        self.dropped_raw = 0

    # -- on the loop ------------------------------------------------------------------------

    def record(self, rec: UsageRecord) -> None:
        """Add one finished request to the minute's sums (dict and list increments only)."""
        pending = self._pending
        minute = self._minute
        if not minute <= rec.at < self._minute_end:  # a new minute (computed once a minute)
            minute = self._minute = rec.at.replace(second=0, microsecond=0)
            self._minute_end = minute + timedelta(minutes=1)
        key = (
            minute,
            rec.model,
            rec.path,
            rec.status,
            rec.stream,
            rec.api_key_id,
        )
        sums = pending.rollups.get(key)
        if sums is None:
            sums = pending.rollups[key] = [0.0] * (_SUMS + _N_BUCKETS)
        sums[0] += 1
        sums[3] += rec.latency_ms
        sums[_SUMS + bisect_left(LATENCY_BOUNDS_MS, rec.latency_ms)] += 1
        raw_index = -1
        if self.raw_rows:
            raw_index = len(pending.raw)
            pending.raw.append(raw_row(rec, None, None))
        if rec.usage is not None:
            prompt, completion = tokens_of(rec.usage)
            sums[1] += prompt or 0
            sums[2] += completion or 0
            _add_tokens(pending.tokens, rec.model, prompt, completion)
            if raw_index >= 0:
                pending.raw[raw_index].update(prompt_tokens=prompt, completion_tokens=completion)
        elif rec.body:
            pending.bodies.append((key, rec.body, raw_index))

    async def flush(self) -> int:
        """Write what was recorded since the previous flush; returns the requests written (0 if
        the write failed: the batch is then kept for the next flush)."""
        batch, self._pending = self._pending, Batch()
        if not batch:
            return 0
        try:
            return await self.writer.run(self._write, batch)
        except Exception as exc:
            log.error("usage flush failed, retried at the next one: %s: %s", type(exc).__name__, exc)
            self._restore(batch)
            return 0

    def _restore(self, failed: Batch) -> None:
        self._pending.merge(failed)
        excess = len(self._pending.raw) - MAX_PENDING_RAW
        if excess > 0:  # the oldest rows are the failed ones, whose bodies are already parsed
            del self._pending.raw[:excess]
            self._pending.bodies = [(k, b, i - excess if i >= 0 else -1) for k, b, i in self._pending.bodies]
            self.dropped_raw += excess
            log.warning("usage: %d raw rows dropped while the database fails", excess)

    async def run(self, interval_seconds: float, clock: Clock) -> None:
        """Flush every `interval_seconds`, prune old rows every hour; survives any failure."""
        while True:
            await asyncio.sleep(interval_seconds)
            await self.flush()
            try:
                await self.prune(clock())
            except Exception:
                log.exception("usage prune failed; tried again later")

    async def prune(self, now: datetime) -> int:
        """Delete rows past their retention, a slice per writer job (other writes go between)."""
        if self._last_prune is not None and now - self._last_prune < PRUNE_EVERY:
            return 0
        self._last_prune = now
        deleted = 0
        for days, prune in (
            (self.retention_days, self.store.prune_usage),
            (self.rollup_retention_days, self.store.prune_usage_minutes),
        ):
            if days is None:
                continue
            before = now - timedelta(days=days)
            while (n := await self.writer.run(prune, before, limit=PRUNE_SLICE)) > 0:
                deleted += n
                if n < PRUNE_SLICE:
                    break
        return deleted

    # -- in the writer's job ----------------------------------------------------------------

    def _write(self, batch: Batch) -> int:
        """Read the bodies' token counts, count tokens in Prometheus, add the minute sums and
        insert raw rows. Touches only `batch` (detached from the loop) and `_written`."""
        self._parse(batch)
        for model, (prompt, completion) in batch.tokens.items():
            if prompt:
                self.metrics.tokens.labels(model=model, kind="prompt").inc(prompt)
            if completion:
                self.metrics.tokens.labels(model=model, kind="completion").inc(completion)
        batch.tokens = {}  # counted once, even if the write below fails and is retried
        rows = [minute_row(key, sums) for key, sums in batch.rollups.items()]
        written = self.store.add_usage_minutes(rows, known=self._written)
        requests = sum(int(sums[0]) for sums in batch.rollups.values())
        batch.rollups = {}  # written: a failure of the raw rows below must not add them again
        self._remember(written)
        while batch.raw:
            yield_gil()
            self.store.add_usage(batch.raw[:RAW_INSERT_SLICE])
            del batch.raw[:RAW_INSERT_SLICE]
        return requests

    def _parse(self, batch: Batch) -> None:
        bodies, batch.bodies = batch.bodies, []
        for start in range(0, len(bodies), PARSE_SLICE):
            if start:
                yield_gil()
            for key, body, raw_index in bodies[start : start + PARSE_SLICE]:
                prompt, completion = body_tokens(body)
                if prompt is None and completion is None:
                    continue
                sums = batch.rollups[key]
                sums[1] += prompt or 0
                sums[2] += completion or 0
                _add_tokens(batch.tokens, key[1], prompt, completion)
                if raw_index >= 0:
                    batch.raw[raw_index].update(prompt_tokens=prompt, completion_tokens=completion)

    def _remember(self, keys: list[UsageKey]) -> None:
        """Keep the keys of the last few minutes (later flushes add to their rows)."""
        self._written.update(keys)
        if keys:
            horizon = max(k[0] for k in keys) - timedelta(minutes=5)
            self._written = {k for k in self._written if k[0] >= horizon}
