"""Token buckets for per-peer inbound rates."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens; returns 0 on success, else seconds until they would be there."""
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if n <= self._tokens:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self._rate
