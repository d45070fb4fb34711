"""Logging helpers shared by every layer (no blobmesh imports: any module may use them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Log repeated events of one kind as one line per ``interval`` with a count.

    The first event of a ``key`` is logged at once; later ones within ``interval`` seconds are
    only counted, and the next line logged for that key says how many it stood for.  Keys name
    kinds of events (``"refused"``), never peers, so the table stays small.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, suppressed)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log (or count) one event; True if a line was written."""
        now = self._clock()
        start, suppressed = self._windows.get(key, (float("-inf"), 0))
        if now - start < self._interval:
            self._windows[key] = (start, suppressed + 1)
            return False
        self._windows[key] = (now, 0)
        if suppressed:
            msg += " (and %d more like it in the last %.0fs)"
            args = (*args, suppressed, now - start)
        self._log.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)
