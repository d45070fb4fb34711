"""One owner for background work: spawn, supervise, start in order, close.

Every long-lived task in blobmesh belongs to a :class:`TaskOwner`. The owner keeps a strong
reference to each task, applies one failure policy to it and cancels and awaits all of them in
:meth:`TaskOwner.aclose`, so no task outlives its owner and no failure is dropped:

- ``policy="log"`` (default): a task that raises is logged with its traceback and counted; it
  is not restarted (fit for one-shot work such as serving one stream).
- ``policy="restart"``: the task's factory is called again after a back-off that grows while
  it keeps failing (fit for loops that must never stop: watchers, reconcilers).
- ``policy="fatal"``: the owner's ``on_fatal`` callback is called (a node stops itself).

Failures are counted per owner and in a process-wide registry (:func:`failure_counts`) that the
node exports as ``blobmesh_task_failures_total{task=...}``. Cancellation is never a failure.

:meth:`TaskOwner.start` follows trio's ``nursery.start()``: it runs a task that calls
``task_status.started(value)`` once it is ready, and returns that value, so services start in
order (a listener is bound before anything dials it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, Literal, TypeVar

__all__ = ["Policy", "TaskOwner", "TaskStatus", "failure_counts"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Policy = Literal["log", "restart", "fatal"]

_FAILURES: collections.Counter[str] = collections.Counter()


def failure_counts() -> dict[str, int]:
    """Failed background tasks in this process so far, by task name."""
    return dict(_FAILURES)


class TaskStatus(Generic[T]):
    """Handed to a task run by :meth:`TaskOwner.start`; call :meth:`started` once ready."""

    def __init__(self) -> None:
        self._future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def started(self, value: T) -> None:
        """Report readiness (once); :meth:`TaskOwner.start` then returns ``value``."""
        if self._future.done():
            raise RuntimeError("task_status.started() called twice")
        self._future.set_result(value)


class TaskOwner:
    """Owns a set of asyncio tasks: one spawn helper, one failure policy, one close.

    ``name`` prefixes every task name (``"node/space"``); ``on_fatal`` is called with the
    exception of a ``policy="fatal"`` task that fails.
    """

    def __init__(self, name: str, *,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 restart_backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.name = name
        self._on_fatal = on_fatal
        self._backoff_min, self._backoff_max = restart_backoff
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.failures: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closing(self) -> bool:
        """True once :meth:`aclose` has begun: no new task is accepted."""
        return self._closing

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str,
              policy: Literal["log", "fatal"] = "log") -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned here; a failure is logged, counted, and (fatal) escalated.

        Raises :class:`RuntimeError` once the owner is closing (the coroutine is closed so it
        does not warn as never awaited).
        """
        if self._closing:
            coro.close()
            raise RuntimeError(f"{self.name}: closing, cannot spawn {name}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}/{name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, policy))
        return task

    def spawn_restarting(self, factory: Callable[[], Awaitable[Any]], *,
                         name: str) -> asyncio.Task[None]:
        """Run ``factory()`` and run it again, after a growing back-off, whenever it fails.

        A factory whose coroutine returns normally is not restarted.
        """
        return self.spawn(self._restarting(factory, name), name=name)

    async def start(self, fn: Callable[[TaskStatus[T]], Coroutine[Any, Any, Any]], *,
                    name: str, policy: Literal["log", "fatal"] = "log") -> T:
        """Spawn ``fn(task_status)`` and wait until it calls ``task_status.started(value)``.

        If the task fails or returns before reporting readiness, its exception (or a
        :class:`RuntimeError`) is raised here instead.
        """
        status: TaskStatus[T] = TaskStatus()
        task = self.spawn(fn(status), name=name, policy=policy)
        ready: asyncio.Future[T] = status._future
        done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            return ready.result()
        ready.cancel()
        if task.cancelled():
            raise asyncio.CancelledError
        exc = task.exception()
        if exc is not None:
            raise exc
        raise RuntimeError(f"{self.name}/{name} returned before reporting it started")

    async def aclose(self) -> None:
        """Cancel every task and wait for all of them (idempotent)."""
        self._closing = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)

    async def __aenter__(self) -> TaskOwner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- internals -------------------------------------------------------------------------

    async def _restarting(self, factory: Callable[[], Awaitable[Any]], name: str) -> None:
        delay = self._backoff_min
        while True:
            try:
                await factory()
                return
            except Exception as exc:  # the policy: log, count, back off, run again
                self._record(f"{self.name}/{name}", exc, restarting=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    def _done(self, task: asyncio.Task[Any], policy: Policy) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self._record(task.get_name(), exc, restarting=False)
        if policy == "fatal" and self._on_fatal is not None:
            self._on_fatal(exc)

    def _record(self, name: str, exc: BaseException, *, restarting: bool) -> None:
        self.failures[name] += 1
        _FAILURES[name] += 1
        log.error("background task %s failed%s", name,
                  " (restarting)" if restarting else "", exc_info=exc)
