"""A virtual-time asyncio event loop: nothing ever waits for real.

`VirtualLoop.time()` is a number the loop advances itself: when the selector is asked to wait
with a timeout and no file descriptor is ready, it moves virtual time forward by that timeout
instead of sleeping, so the earliest timer is due at once. Executor work (`asyncio.to_thread`,
`run_in_executor`) runs inline on the loop's thread, so no thread can make a run depend on the
OS scheduler.

Some libraries run small functions on threads of their own (FastAPI runs sync dependencies
through anyio's worker threads): before each poll the loop waits, for real, until every such
thread bound to it has handed its result back, so a result always lands at the same point of
the run.

Callbacks are tagged with the `OWNER` context variable of the code that scheduled them (each
simulated gateway runs its tasks in a context naming it). `freeze(owner)` parks that owner's
callbacks — a stalled process (SIGSTOP); `thaw(owner)` runs them again, late; `kill(owner)`
drops them for good — a `kill -9`: no `finally` block of the owner ever runs while the seed does.

A killed owner's coroutines stay suspended where the kill found them, though, and Python closes a
suspended coroutine when it is collected, running its `finally` blocks: with no loop running, or
inside the loop of a later seed (a long sweep collected them there, whenever its caches let them
go: "Event loop is closed" tracebacks, and dead code running next to a live seed). `reap(owner)`
closes them at a moment the simulator chooses, once the seed's outcome is taken (see `Sim.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import selectors
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future as ConcurrentFuture
from typing import Any

OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("sim_owner", default=None)
# A coroutine's `finally` may await (retries): each close unwinds it up to the next await.
REAP_CLOSES = 100


class SimDeadlock(RuntimeError):
    """Nothing is ready and no timer is scheduled: the run would wait forever."""


class SimBudgetExceeded(RuntimeError):
    """The run used more real time than its budget (a busy loop in the code under test?)."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._loop._join_worker_threads()
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise SimDeadlock("no callback is ready and no timer is scheduled")
        self._loop._advance(timeout)
        return []


class _Gate:
    """A callback of an owned context: runs unless its owner is frozen (then it is parked)."""

    __slots__ = ("callback", "context", "loop", "owner")

    def __init__(
        self, loop: VirtualLoop, owner: str, callback: Callable[..., object], context: contextvars.Context
    ) -> None:
        self.loop, self.owner, self.callback, self.context = loop, owner, callback, context

    def __call__(self, *args: Any) -> None:
        if self.owner in self.loop.frozen:
            if self.owner not in self.loop.killed:
                self.loop._parked.setdefault(self.owner, []).append((self, args))
            return
        self.callback(*args)


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, *, real_budget_seconds: float = 120.0) -> None:
        super().__init__(selector=_VirtualSelector(self))
        self._now = 0.0
        self.frozen: set[str] = set()
        self.killed: set[str] = set()
        self._parked: dict[str, list[tuple[_Gate, tuple[Any, ...]]]] = {}
        self._tasks_of: dict[str, weakref.WeakSet[asyncio.Task[Any]]] = {}
        self._deadline = time.monotonic() + real_budget_seconds
        self._advances = 0

    # -- time -------------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    def _advance(self, seconds: float) -> None:
        self._now += max(seconds, 0.0)
        self._advances += 1
        if self._advances % 512 == 0 and time.monotonic() > self._deadline:
            raise SimBudgetExceeded(f"real-time budget exhausted at virtual t={self._now:.1f}s")

    def check_budget(self) -> None:
        if time.monotonic() > self._deadline:
            raise SimBudgetExceeded(f"real-time budget exhausted at virtual t={self._now:.1f}s")

    # -- executors run inline ---------------------------------------------------------------

    def _join_worker_threads(self) -> None:
        """Wait until anyio's worker threads of this loop have reported their results (their
        `queue` counts a job as unfinished until it has called `call_soon_threadsafe`)."""
        if threading.active_count() == 1:
            return
        for thread in threading.enumerate():
            queue = getattr(thread, "queue", None)
            if (
                getattr(thread, "loop", None) is not self
                or queue is None
                or getattr(thread, "stopping", True)
            ):
                continue
            with queue.all_tasks_done:  # a stopped worker never marks its last item done
                queue.all_tasks_done.wait_for(
                    lambda q=queue, t=thread: not q.unfinished_tasks or t.stopping or not t.is_alive(),
                    timeout=30,
                )

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        inner: ConcurrentFuture[Any] = ConcurrentFuture()
        try:
            inner.set_result(func(*args))
        except BaseException as exc:  # the caller sees it when it awaits, as from a thread
            inner.set_exception(exc)
        return asyncio.wrap_future(inner, loop=self)

    # -- owners: stall and kill -------------------------------------------------------------

    def _gate(self, callback: Callable[..., object], context: contextvars.Context | None) -> tuple[Any, Any]:
        ctx = context if context is not None else contextvars.copy_context()
        owner = ctx.get(OWNER)
        if owner is None:
            return callback, ctx
        return _Gate(self, owner, callback, ctx), ctx

    def call_soon(self, callback: Any, *args: Any, context: contextvars.Context | None = None) -> Any:
        gated, ctx = self._gate(callback, context)
        return super().call_soon(gated, *args, context=ctx)

    def call_at(
        self, when: float, callback: Any, *args: Any, context: contextvars.Context | None = None
    ) -> Any:
        gated, ctx = self._gate(callback, context)
        return super().call_at(when, gated, *args, context=ctx)

    def create_task(
        self, coro: Any, *, name: str | None = None, context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        task = super().create_task(coro, name=name, context=context)
        owner = context.get(OWNER) if context is not None else OWNER.get()
        if owner is not None:  # the task runs in its creator's context, or in `context`
            self._tasks_of.setdefault(owner, weakref.WeakSet()).add(task)
        return task

    def freeze(self, owner: str) -> None:
        self.frozen.add(owner)

    def thaw(self, owner: str) -> None:
        if owner in self.killed:
            return
        self.frozen.discard(owner)
        for gate, args in self._parked.pop(owner, []):
            super().call_soon(gate.callback, *args, context=gate.context)

    def kill(self, owner: str) -> None:
        self.frozen.add(owner)
        self.killed.add(owner)
        self._parked.pop(owner, None)

    def reap(self, owner: str) -> int:
        """Close the coroutines of a killed owner's unfinished tasks, outside the loop (call it
        when the loop has stopped): their `finally` blocks run now, once, instead of whenever
        they are collected. Without a running loop they fail at their first asyncio call, and
        what they fail with is dropped: that code never runs after a real kill -9. Returns how
        many were closed; a coroutine still not closed after REAP_CLOSES tries raises."""
        assert owner in self.killed and not self.is_running(), "only a killed owner, with the loop stopped"
        reaped = 0
        for task in list(self._tasks_of.pop(owner, ())):
            coro = task.get_coro()
            if task.done() or not inspect.iscoroutine(coro):
                continue
            _close(coro)
            reaped += 1
        return reaped


def _close(coro: Coroutine[Any, Any, Any]) -> None:
    for _ in range(REAP_CLOSES):
        if inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED:
            return
        with contextlib.suppress(Exception):  # e.g. RuntimeError: no running event loop (see reap)
            coro.close()
    raise RuntimeError(f"{coro!r} is not closed after {REAP_CLOSES} tries")


def owned_context(owner: str) -> contextvars.Context:
    """A fresh context whose tasks (and every task they create) belong to `owner`."""
    ctx = contextvars.copy_context()
    ctx.run(OWNER.set, owner)
    return ctx
