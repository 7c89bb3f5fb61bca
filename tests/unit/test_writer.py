"""The database writer: one thread, jobs in submission order, results and errors through futures;
the inline executor runs the same jobs deterministically in the caller's thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from state import Store
from state.writer import InlineExecutor, Writer


async def test_jobs_run_in_order_on_one_thread_that_is_not_the_loops() -> None:
    writer = Writer()
    done: list[int] = []
    threads: set[int] = set()

    def job(n: int) -> int:
        if n == 0:
            time.sleep(0.05)  # the first job is slow: the others must still wait for it
        threads.add(threading.get_ident())
        done.append(n)
        return n * 2

    futures = [writer.submit(job, n) for n in range(200)]
    assert writer.pending > 0  # submit did not wait
    assert await writer.run(job, 200) == 400
    assert [f.result() for f in futures] == [n * 2 for n in range(200)]
    assert done == list(range(201))
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert writer.pending == 0
    writer.close()


async def test_run_raises_the_jobs_error_and_submit_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    writer = Writer()

    def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="awaited"):
        await writer.run(fail, "awaited")
    future = writer.submit(fail, "fire and forget")
    with caplog.at_level(logging.ERROR, logger="state.writer"):
        await writer.barrier()
    assert isinstance(future.exception(), ValueError)
    assert [r.getMessage() for r in caplog.records] == [
        "db-writer: test_run_raises_the_jobs_error_and_submit_logs_it.<locals>.fail failed: fire and forget"
    ]
    writer.close()


async def test_inline_executor_runs_each_job_at_once_in_the_callers_thread() -> None:
    writer = Writer(InlineExecutor())
    seen: list[tuple[int, int]] = []
    future = writer.submit(lambda: seen.append((1, threading.get_ident())))
    assert future.done() and seen == [(1, threading.get_ident())]  # before any await
    with pytest.raises(ZeroDivisionError):
        await writer.run(lambda: 1 / 0)
    assert writer.pending == 0


async def test_a_cancelled_wait_does_not_cancel_the_write() -> None:
    writer = Writer()
    gate = threading.Event()
    done: list[str] = []
    writer.submit(gate.wait, 5)  # the writer is busy: the next job waits in the queue
    waiting = asyncio.create_task(writer.run(done.append, "written"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set()
    await writer.barrier()
    assert done == ["written"]
    writer.close()


def test_close_runs_what_is_queued_then_refuses_work() -> None:
    writer = Writer()
    done: list[int] = []
    for n in range(5):
        writer.submit(lambda n=n: (time.sleep(0.01), done.append(n)))
    writer.close()
    assert done == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(done.append, 5)
    writer.close()  # idempotent


async def test_store_writes_through_the_writer_while_the_loop_keeps_running(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    store.create_all()
    writer = Writer()
    ticks = 0

    async def count_ticks() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    counter = asyncio.create_task(count_ticks())
    rows = [{"id": f"m{n}", "priority": n % 3} for n in range(2000)]
    await writer.run(store.upsert_models, rows)
    counter.cancel()
    assert ticks > 0  # the loop turned while the rows were written
    assert store.get_model("m1999") is not None
    await writer.run(
        store.upsert_models, [{"id": "m1999", "priority": 7}, {"id": "new", "kind": "embedding"}]
    )
    known, new = store.get_model("m1999"), store.get_model("new")
    assert known is not None and known.priority == 7 and new is not None and new.kind == "embedding"
    writer.close()
    store.close()
