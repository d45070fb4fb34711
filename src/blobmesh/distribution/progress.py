"""How often targets report progress to the source, and whom the source asks when a target
fell silent (sans-I/O: the simulator uses it too)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import TypeVar

PROGRESS_INTERVAL = 0.25  # seconds between one target's progress notes, in a small scope
SOURCE_NOTES_PER_S = 200.0  # ... stretched so all targets together send about this many


def progress_note_interval(targets: int, interval: float, source_budget: float) -> float:
    """Seconds between one target's progress notes to the source: ``interval``, stretched so
    that all ``targets`` together send about ``source_budget`` notes per second, whatever
    the size of the scope (the source's cost must not grow with N)."""
    return max(interval, targets / source_budget)


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


__all__ = ["PROGRESS_INTERVAL", "QUERY_AFTER", "SOURCE_NOTES_PER_S", "progress_note_interval",
           "query_after", "targets_to_query"]
