"""Usage rollups: what the recorder adds up on the loop, what the writer parses and writes, that a
failed write loses nothing, and that a day at 3,000 requests/s is a few thousand rows per model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel

from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import UsageRecord, UsageRecorder, body_tokens
from state import Store
from state.tables import LATENCY_COLUMNS
from state.writer import InlineExecutor, Writer

T0 = datetime(2026, 11, 2, 15, 0, tzinfo=UTC)
PATH = "/v1/chat/completions"


def answer(prompt: int, completion: int, content: str = "hello") -> bytes:
    """A chat completion as vLLM writes it: usage after the choices."""
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "system_fingerprint": None,
        }
    ).encode()


def rec(
    at: datetime, *, model: str = "m", status: int = 200, latency_ms: float = 30.0, **kw: object
) -> UsageRecord:
    fields: dict[str, object] = {"deployment_id": "d1", "path": PATH, "stream": False, **kw}
    return UsageRecord(at=at, model=model, status=status, latency_ms=latency_ms, **fields)  # type: ignore[arg-type]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store(db_url)
    st.upgrade()
    yield st
    st.close()


def tokens_counted(metrics: Metrics, model: str, kind: str) -> float:
    return metrics.tokens.labels(model=model, kind=kind)._value.get()


def test_body_tokens_reads_the_top_level_usage() -> None:
    assert body_tokens(answer(12, 34)) == (12, 34)
    # The word inside the content is escaped JSON, never a key.
    assert body_tokens(answer(1, 2, content='say "usage": {"prompt_tokens": 99}')) == (1, 2)
    assert body_tokens(b'{"choices": []}') == (None, None)
    assert body_tokens(b'{"usage": null}') == (None, None)
    assert body_tokens(b'{"usage": {"prompt_tokens": "7"}}') == (None, None)
    assert body_tokens(b'{"usage": {"prompt_tokens": 3, "comp') == (None, None)  # cut off
    assert body_tokens(b'{"usage": ' + b"[" * 3000) == (None, None)  # deep nesting
    big = answer(5, 6, content="x" * 5_000_000)
    assert body_tokens(big) == (5, 6)


async def test_a_minute_is_one_row_per_key_and_later_flushes_add_to_it(store: Store) -> None:
    metrics = Metrics()
    usage = UsageRecorder(store, metrics, Writer(InlineExecutor()))
    usage.record(rec(T0 + timedelta(seconds=1), latency_ms=8, body=answer(10, 20)))
    usage.record(rec(T0 + timedelta(seconds=59), latency_ms=400, body=answer(1, 2)))
    usage.record(
        rec(T0 + timedelta(seconds=30), stream=True, usage={"prompt_tokens": 4, "completion_tokens": 5})
    )
    usage.record(rec(T0 + timedelta(seconds=31), status=503, latency_ms=0.4))
    usage.record(rec(T0 + timedelta(seconds=61), api_key_id="key-1", body=answer(7, 7)))
    assert store.usage_minute_rows() == 0  # nothing written by record()
    assert await usage.flush() == 5
    usage.record(rec(T0 + timedelta(seconds=2), latency_ms=400_000, body=answer(100, 200)))
    assert await usage.flush() == 1

    rows = {(r.minute, r.status, r.stream, r.api_key_id): r for r in store.usage_minutes()}
    assert sorted(rows) == sorted(
        [
            (T0, 200, False, None),
            (T0, 200, True, None),
            (T0, 503, False, None),
            (T0 + timedelta(minutes=1), 200, False, "key-1"),
        ]
    )
    buffered = rows[(T0, 200, False, None)]
    assert (buffered.requests, buffered.prompt_tokens, buffered.completion_tokens) == (3, 111, 222)
    assert buffered.latency_ms_sum == 8 + 400 + 400_000
    assert (buffered.lat_10ms, buffered.lat_500ms, buffered.lat_inf) == (1, 1, 1)
    assert sum(getattr(buffered, c) for c in LATENCY_COLUMNS) == 3
    assert rows[(T0, 503, False, None)].prompt_tokens == 0
    assert store.usage_count() == 6 and store.usage_count(model="m") == 6
    assert tokens_counted(metrics, "m", "prompt") == 10 + 1 + 4 + 7 + 100
    assert tokens_counted(metrics, "m", "completion") == 20 + 2 + 5 + 7 + 200
    assert store.usage() == []  # no raw rows unless asked for


async def test_a_failed_write_is_kept_and_written_once_at_the_next_flush(store: Store) -> None:
    metrics = Metrics()
    usage = UsageRecorder(store, metrics, Writer(), raw_rows=True)
    usage.record(rec(T0, body=answer(3, 4)))
    usage.record(
        rec(T0 + timedelta(seconds=5), stream=True, usage={"prompt_tokens": 1, "completion_tokens": 1})
    )
    with store.engine.begin() as conn:  # a real database error: the tables are gone
        conn.execute(text("DROP TABLE usage_minutes"))
        conn.execute(text("DROP TABLE usage"))
    assert await usage.flush() == 0
    usage.record(rec(T0 + timedelta(seconds=10), body=answer(5, 6)))  # recorded meanwhile
    SQLModel.metadata.create_all(store.engine)  # the tables are back
    assert await usage.flush() == 3
    assert await usage.flush() == 0  # nothing left over, nothing twice
    [buffered] = [r for r in store.usage_minutes() if not r.stream]
    assert (buffered.requests, buffered.prompt_tokens, buffered.completion_tokens) == (2, 8, 10)
    assert store.usage_count() == 3
    raw = store.usage()
    assert [(u.prompt_tokens, u.completion_tokens) for u in raw] == [(3, 4), (1, 1), (5, 6)]
    assert tokens_counted(metrics, "m", "prompt") == 9  # counted once although written twice
    usage.writer.close()


async def test_raw_rows_are_pruned_after_the_retention(store: Store) -> None:
    usage = UsageRecorder(store, Metrics(), Writer(InlineExecutor()), raw_rows=True, retention_days=2)
    for day in range(5):
        usage.record(rec(T0 + timedelta(days=day)))
    await usage.flush()
    first = T0 + timedelta(days=4, minutes=-1)
    assert await usage.prune(first) == 2  # days 0 and 1
    assert [u.at.day for u in store.usage()] == [4, 5, 6]
    assert await usage.prune(first + timedelta(minutes=31)) == 0  # day 2 is due, but pruned hourly
    assert await usage.prune(first + timedelta(hours=1)) == 1
    assert store.usage_count() == 5  # the rollups are kept (no rollup retention set)


async def test_a_day_at_3000_requests_per_second_is_a_few_thousand_rows_per_model(store: Store) -> None:
    """The real recorder under a fake clock: three whole minutes at the full 3,000 requests/s with
    a flush every 2 s, as the gateway does, show that a minute's rows do not grow with the rate;
    every other minute of the day carries the same mix of keys at a lower rate (a day at the full
    rate is 259 million calls to record(): the rows would be the same)."""
    usage = UsageRecorder(store, Metrics(), Writer(InlineExecutor()))
    mix = [(200, False), (200, True), (503, False)]  # answered, streamed, overloaded
    recorded = 0
    for minute in range(24 * 60):
        full_rate = minute in (0, 700, 1439)
        per_flush, flushes = (3000 * 2, 30) if full_rate else (len(mix), 1)
        for flush in range(flushes):
            at = T0 + timedelta(minutes=minute, seconds=2 * flush)
            for n in range(per_flush):
                status, stream = mix[n % len(mix)]
                usage.record(rec(at, status=status, stream=stream, latency_ms=n % 2000))
            recorded += per_flush
            await usage.flush()
    assert store.usage_count(model="m") == recorded
    assert recorded > 3 * 60 * 3000
    rows = store.usage_minute_rows()
    assert rows == 24 * 60 * len(mix) == 4320
    full = [r for r in store.usage_minutes() if r.minute == T0 + timedelta(minutes=700)]
    assert len(full) == len(mix) and sum(r.requests for r in full) == 3000 * 60
