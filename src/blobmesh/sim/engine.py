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

    __slots__ = ("fn", "when")

    def __init__(self, when: float, fn: Callback | None) -> None:
        self.when = when
        self.fn = fn  # None once cancelled or run

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
        # (when, sequence, fn, args, its Timer or None): ties run in scheduling order, and
        # the comparison never gets past the unique sequence number
        self._heap: list[tuple[float, int, Callback, tuple[Any, ...], Timer | None]] = []
        self._seq = itertools.count()
        self._stopped = False

    def at(self, when: float, fn: Callback, *args: Any) -> Timer:
        """Run ``fn(*args)`` at virtual time ``when`` (not before ``now``)."""
        now = self.now
        if when < now:
            when = now
        timer = Timer(when, fn)
        heapq.heappush(self._heap, (when, next(self._seq), fn, args, timer))
        return timer

    def after(self, delay: float, fn: Callback, *args: Any) -> Timer:
        return self.at(self.now + delay, fn, *args)

    def post(self, delay: float, fn: Callback, *args: Any) -> None:
        """:meth:`after` for an event nobody cancels (a message on its way): no Timer."""
        now = self.now
        when = now + delay
        if when < now:
            when = now
        heapq.heappush(self._heap, (when, next(self._seq), fn, args, None))

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
        ran = 0
        try:
            while heap and not self._stopped:
                entry = pop(heap)
                when, _, fn, args, timer = entry
                if when > until:
                    heapq.heappush(heap, entry)
                    break
                if timer is not None:
                    if timer.fn is None:
                        continue  # cancelled
                    timer.fn = None
                if when >= next_tick and on_tick is not None:
                    while next_tick <= when:
                        next_tick += tick
                    on_tick(when)
                self.now = when
                ran += 1
                fn(*args)
        finally:
            self.events_run += ran
        if until != float("inf") and not self._stopped:
            self.now = max(self.now, until)


__all__ = ["Simulator", "Timer"]
