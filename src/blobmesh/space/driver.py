"""Runs the space's sans-I/O cores on the event loop: one timer, re-armed to the earliest core.

After every event fed to a core the caller pokes the driver; the timer is re-armed once per
loop iteration however many pokes came, to the earliest :meth:`TimedCore.get_timer`.  When it
fires, every core's :meth:`TimedCore.handle_timer` runs and each action goes to ``execute``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from blobmesh.space.metrics import Metrics

log = logging.getLogger(__name__)

A_co = TypeVar("A_co", covariant=True)
A = TypeVar("A")


class TimedCore(Protocol[A_co]):
    def get_timer(self) -> float | None:
        """When the core next has work (loop time), None if only an event can give it some."""

    def handle_timer(self, now: float) -> Sequence[A_co]: ...


class Driver(Generic[A]):
    """One ``loop.call_at`` for all of ``cores``; ``execute`` carries out their actions."""

    def __init__(self, cores: Sequence[TimedCore[A]], execute: Callable[[A], None],
                 metrics: Metrics) -> None:
        self._cores = cores
        self._execute = execute
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._when = float("inf")
        self._poked = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._loop = None

    def poke(self) -> None:
        """A core's timer may have moved: re-arm (soon, once for all pokes until then)."""
        if self._loop is None or self._poked:
            return
        self._poked = True
        self._loop.call_soon(self._arm)

    def _arm(self) -> None:
        self._poked = False
        if self._loop is None:
            return
        timers = [t for c in self._cores if (t := c.get_timer()) is not None]
        when = min(timers, default=float("inf"))
        if self._timer is not None and when == self._when:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._when = when
        if when != float("inf"):
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        self._timer = None
        # call_at may run a callback up to the clock's resolution early: it is due all the same
        now = max(self._loop.time(), self._when)
        try:
            for core in self._cores:
                for action in core.handle_timer(now):
                    try:
                        self._execute(action)
                    except Exception:  # one failing action must not stop the others
                        log.exception("space action %r failed", action)
                        self._metrics.inc("loop_errors")
        finally:
            self._arm()
