"""How often targets report progress to the source, and whom the source asks when a target
fell silent (sans-I/O: the simulator uses it too)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

PROGRESS_INTERVAL = 0.25  # seconds between one target's progress notes, in a small scope
SOURCE_NOTES_PER_S = 200.0  # ... stretched so all targets together send about this many
# final notes (a target completed or failed) a source gets per second at most, in a large
# scope: each target's is delayed by a random part of ``targets / FINAL_NOTES_PER_S`` seconds
FINAL_NOTES_PER_S = 1000.0


def progress_note_interval(targets: int, interval: float, source_budget: float) -> float:
    """Seconds between one target's progress notes to the source: ``interval``, stretched so
    that all ``targets`` together send about ``source_budget`` notes per second, whatever
    the size of the scope (the source's cost must not grow with N)."""
    return max(interval, targets / source_budget)


class NoteSchedule:
    """When one target sends the source a progress note (sans-I/O: ``now`` in, yes or no out).

    In a small scope (``every`` is ``interval``) a state change and the last byte are noted at
    once, progress every ``interval``, and a final state at once.  In a large scope, where
    ``every`` is stretched so that all targets together send about ``budget`` notes a second,
    nothing is noted at once, since whatever happens at one target tends to happen at all of
    them together:

    * the first note comes at a random moment of the ``every`` seconds after the first
      report (N targets starting together each noting their first piece at once sent the
      source N notes within a second: 10,000 of them at 10,000 targets);
    * a state change that is not final (stalled, queued behind a higher priority, retrying,
      a peer banned) rides on the next periodic note, which carries the state of its moment;
      the last byte, on the final note;
    * a final note (:meth:`final_delay`) waits a random part of ``targets / final_budget``
      seconds (the targets of a swarm complete within about a second of each other).

    So the source gets at most about ``budget + final_budget`` notes a second at any N; in a
    large scope its view of a target is up to ``every`` seconds old (one ``every`` is
    ``targets / budget``, 50 s at 10,000 targets) and a completion reaches it up to
    ``targets / final_budget`` seconds late (10 s at 10,000 targets).
    """

    def __init__(self, targets: int, now: float, interval: float = PROGRESS_INTERVAL,
                 budget: float = SOURCE_NOTES_PER_S, final_budget: float = FINAL_NOTES_PER_S,
                 rng: random.Random | None = None) -> None:
        self.every = progress_note_interval(targets, interval, budget)
        self.stretched = self.every > interval
        self._rng = rng or random.Random()
        self._final_window = targets / final_budget if self.stretched else 0.0
        self._next: float | None = None if self.stretched else now
        self._noted: Hashable = None  # the state the last note carried

    def progress(self, state: Hashable, done: bool, now: float) -> bool:
        """Progress to report (``state``: the job's state and reason; ``done``: every byte
        is here): whether to send it now."""
        if self._next is None:  # the first report, in a large scope
            self._next = now + self._rng.uniform(0.0, self.every)
        if now >= self._next or (not self.stretched and (done or state != self._noted)):
            self._noted = state
            self._next = now + self.every
            return True
        return False

    def final_delay(self) -> float:
        """Seconds to hold this target's final note back (0 in a small scope)."""
        return self._rng.uniform(0.0, self._final_window) if self._final_window else 0.0


QUERY_AFTER = 10.0  # a target silent this long (and at least two note intervals) is asked

_N = TypeVar("_N")


def query_after(targets: int, interval: float, source_budget: float,
                floor: float = QUERY_AFTER) -> float:
    """Seconds of silence after which the source asks a target where it stands: ``floor``,
    or two of the target's note intervals in a large scope (a healthy target notes first)."""
    return max(floor, 2 * progress_note_interval(targets, interval, source_budget))


def targets_to_query(last_heard: Mapping[_N, float], asked: Mapping[_N, float],
                     candidates: Iterable[_N], now: float, silent_for: float,
                     budget: int) -> list[_N]:
    """Which ``candidates`` (targets in no final state) the source asks now: those heard from
    and asked neither within ``silent_for`` seconds, the longest silent first, at most
    ``budget`` of them, so that queries, and the notes answering them, cost the source a
    bounded rate whatever the number of targets."""
    cutoff = now - silent_for
    due = ((max(last_heard.get(n, 0.0), asked.get(n, 0.0)), i, n)
           for i, n in enumerate(candidates))
    return [n for _, _, n in heapq.nsmallest(
        budget, (d for d in due if d[0] <= cutoff))] if budget > 0 else []


__all__ = ["FINAL_NOTES_PER_S", "PROGRESS_INTERVAL", "QUERY_AFTER", "SOURCE_NOTES_PER_S",
           "NoteSchedule", "progress_note_interval", "query_after", "targets_to_query"]
