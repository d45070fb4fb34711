"""A deterministic discrete-event loop: a heap of timed callbacks, a virtual clock, one RNG.

Events at the same time run in the order they were scheduled, and every random choice of a
run comes from :attr:`Simulator.rng`, so a seed fixes the whole run.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]


class Timer:
    """A scheduled callback; :meth:`cancel` makes it a no-op."""

    __slots__ = ("args", "fn", "when")

    def __init__(self, when: float, fn: Callback | None, args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args

    def cancel(self) -> None:
        self.fn = None

    @property
    def active(self) -> bool:
        return self.fn is not None


class Simulator:
    """The virtual clock ``now`` (seconds) and the event heap."""

    def __init__(self, seed: int = 0) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.events_run = 0
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopped = False

    def at(self, when: float, fn: Callback, *args: Any) -> Timer:
        """Run ``fn(*args)`` at virtual time ``when`` (not before ``now``)."""
        now = self.now
        if when < now:
            when = now
        timer = Timer(when, fn, args)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def after(self, delay: float, fn: Callback, *args: Any) -> Timer:
        return self.at(self.now + delay, fn, *args)

    def stop(self) -> None:
        """End :meth:`run` after the current event."""
        self._stopped = True

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float = float("inf"),
            on_tick: Callable[[float], None] | None = None, tick: float = 1.0) -> None:
        """Run events in time order until none is left, ``until`` or :meth:`stop`.

        ``on_tick(now)`` is called whenever virtual time passed another ``tick`` seconds
        (a progress bar, periodic sampling).
        """
        heap = self._heap
        pop = heapq.heappop
        next_tick = self.now + tick if on_tick is not None else float("inf")
        self._stopped = False
        while heap and not self._stopped:
            when, _, timer = heap[0]
            if when > until:
                break
            pop(heap)
            fn = timer.fn
            if fn is None:
                continue
            timer.fn = None
            if when >= next_tick and on_tick is not None:
                while next_tick <= when:
                    next_tick += tick
                on_tick(when)
            self.now = when
            self.events_run += 1
            fn(*timer.args)
        if until != float("inf") and not self._stopped:
            self.now = max(self.now, until)


__all__ = ["Simulator", "Timer"]
