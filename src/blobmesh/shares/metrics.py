"""Counters of the shares service, exported in the Prometheus text format."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class ShareMetrics:
    """Monotonic counters (thread-safe to update; read them as plain attributes)."""

    shares: int = 0
    share_failures: int = 0
    unshares: int = 0
    shared_bytes: int = 0
    share_seconds: float = 0.0
    loads: int = 0
    load_failures: int = 0
    deadlines_exceeded: int = 0
    tries: int = 0
    try_failures: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_share(self, *, ok: bool, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.shares += 1
            self.share_failures += not ok
            self.shared_bytes += nbytes
            self.share_seconds += seconds

    def record_unshare(self) -> None:
        with self._lock:
            self.unshares += 1

    def record_try(self, *, ok: bool) -> None:
        with self._lock:
            self.tries += 1
            self.try_failures += not ok

    def record_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.loaded_bytes += nbytes

    def record_load(self, *, ok: bool, deadline: bool, seconds: float) -> None:
        with self._lock:
            self.loads += 1
            self.load_failures += not ok
            self.deadlines_exceeded += deadline
            self.load_seconds += seconds

    def prometheus_lines(self, prefix: str = "blobmesh_shares_") -> list[str]:
        """``# TYPE`` and sample lines for every counter (durations are ``_seconds_total``)."""
        out: list[str] = []
        with self._lock:
            for f in fields(self):
                if f.name.startswith("_"):
                    continue
                name = f"{prefix}{f.name}_total"
                out += [f"# TYPE {name} counter", f"{name} {getattr(self, f.name)}"]
        return out
