"""How often targets report progress to the source (sans-I/O: the simulator uses it too)."""

from __future__ import annotations

PROGRESS_INTERVAL = 0.25  # seconds between one target's progress notes, in a small scope
SOURCE_NOTES_PER_S = 200.0  # ... stretched so all targets together send about this many


def progress_note_interval(targets: int, interval: float, source_budget: float) -> float:
    """Seconds between one target's progress notes to the source: ``interval``, stretched so
    that all ``targets`` together send about ``source_budget`` notes per second, whatever
    the size of the scope (the source's cost must not grow with N)."""
    return max(interval, targets / source_budget)


__all__ = ["PROGRESS_INTERVAL", "SOURCE_NOTES_PER_S", "progress_note_interval"]
