"""Counters a space keeps: traffic, rejections and every limit hit (``limit_*``)."""

from __future__ import annotations

from collections import Counter


class Metrics:
    """Monotonic named counters; ``snapshot()`` for export."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self._c[name] += n

    def limit(self, which: str, n: int = 1) -> None:
        """Count a bound being hit (``limit_<which>``)."""
        self._c["limit_" + which] += n

    def __getitem__(self, name: str) -> int:
        return self._c[name]

    def snapshot(self) -> dict[str, int]:
        return dict(self._c)
