"""One database writer: the event loop hands it work without waiting.

Every write of the gateway goes through `Writer.submit(fn, *args)`: `fn` (usually a `Store`
method, which stays synchronous) runs on the writer's single thread, in submission order, and
the caller gets a `concurrent.futures.Future`. `await writer.run(fn, *args)` is the same for the
few callers that need the result (or the error) on the loop.

The executor is injectable: a simulator passes `InlineExecutor()`, which runs each job at once in
the caller's thread, so that a run is deterministic. Nothing may therefore rely on the thread for
correctness: a job gets everything it needs as arguments (snapshots taken on the loop) and never
reads structures the loop keeps changing; results and failures come back through the future.

Jobs of a real thread hold the GIL while they run Python code, and the loop waits for it. Jobs
that do a lot (parsing a batch, big inserts) work in small slices and call `yield_gil()` between
them; SQLite releases the GIL while it executes a statement.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class InlineExecutor(Executor):
    """Runs each job immediately in the submitting thread (deterministic; for simulations)."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller through the future, like a thread would
            future.set_exception(exc)
        return future


_writer_thread = threading.local()


def _mark_writer_thread() -> None:
    _writer_thread.active = True


# A zero sleep releases the GIL, but this thread usually takes it back before the loop's thread
# has woken up; a short sleep hands it over for sure (the loop then waits at most one slice).
YIELD_SECONDS = 0.0001


def yield_gil() -> None:
    """Let other threads (the event loop) take the GIL now: call between slices of a long job.
    Only on a writer's own thread: a job run inline (on the loop) has no one to yield to."""
    if getattr(_writer_thread, "active", False):
        time.sleep(YIELD_SECONDS)


class Writer:
    def __init__(self, executor: Executor | None = None, *, name: str = "db-writer") -> None:
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=_mark_writer_thread
        )
        self.name = name
        self._submitted = 0  # changed by submitters only
        self._finished = 0  # changed by the job itself (the writer's thread) only
        self._closed = False

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet (the writer's backlog)."""
        return self._submitted - self._finished

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue `fn(*args, **kwargs)` behind everything submitted before; never waits.
        A failure is logged (fire-and-forget callers would not see it) and set on the future."""
        future = self._submit(fn, args, kwargs)
        future.add_done_callback(self._log_failure(fn))
        return future

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Queue `fn` like `submit` and wait (without blocking the loop) for its result; its
        exception is raised here, not logged. A write once queued is done even if the waiting
        task is cancelled (shutdown): the cancellation only stops the wait."""
        future = self._submit(fn, args, kwargs)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(self._log_failure(fn))  # nobody will see its error otherwise
            raise

    async def barrier(self) -> None:
        """Wait until every job submitted before this call has run."""
        await self.run(_nothing)

    def close(self) -> None:
        """Run what is queued, then stop the thread (if the writer made it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def _submit(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[T]:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        self._submitted += 1
        return self._executor.submit(self._job, fn, args, kwargs)

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            self._finished += 1

    def _log_failure(self, fn: Callable[..., Any]) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                log.error("%s: %s failed: %s", self.name, _name(fn), exc, exc_info=exc)

        return done


def _nothing() -> None:
    return None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
