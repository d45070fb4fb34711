"""The fetch queue: which missing ops to request from whom, as a sans-I/O state machine.

An id is in flight to at most one peer at a time, and each peer has at most one fetch request
in flight.  Failures back off exponentially and rotate to the next known source.  Nothing is
dropped silently: a full queue refuses (``limit_fetch_queue``) and the caller learns how many
ids were taken; an id that exhausts its attempts or sources is counted (``fetch_abandoned``).
Either way gossip will offer it again, because the summaries keep differing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module does no I/O and imports none
    from blobmesh.space.config import Limits
    from blobmesh.space.metrics import Metrics
    from blobmesh.transport.identity import NodeId

_MAX_SOURCES = 8


@dataclass(slots=True)
class _Want:
    sources: list[NodeId] = field(default_factory=list)
    attempts: int = 0
    not_before: float = 0.0
    in_flight: NodeId | None = None


class FetchQueue:
    """Missing op ids and the peers that have them."""

    def __init__(self, limits: Limits, *, retry_base: float, retry_max: float,
                 metrics: Metrics) -> None:
        self._limits = limits
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._metrics = metrics
        self._wants: dict[bytes, _Want] = {}
        self._busy: set[NodeId] = set()
        # next_due() is asked after every event of the space, the queue changes far less often
        self._next: float | None = None
        self._next_known = True

    def __len__(self) -> int:
        return len(self._wants)

    def __contains__(self, op_id: bytes) -> bool:
        return op_id in self._wants

    def add(self, ids: list[bytes], source: NodeId) -> int:
        """Want ``ids`` from ``source``; returns how many were taken (the rest: queue full)."""
        self._next_known = False
        taken = 0
        for op_id in ids:
            w = self._wants.get(op_id)
            if w is None:
                if len(self._wants) >= self._limits.fetch_queue:
                    self._metrics.limit("fetch_queue", len(ids) - taken)
                    return taken
                w = self._wants[op_id] = _Want()
            if source not in w.sources and len(w.sources) < _MAX_SOURCES:
                w.sources.append(source)
            taken += 1
        return taken

    def next_due(self) -> float | None:
        """When :meth:`due` would next return a request (None: only after a reply or a new
        want, since every wanted id is in flight or waits for a busy source)."""
        if not self._next_known:
            times = [w.not_before for w in self._wants.values()
                     if w.in_flight is None and any(s not in self._busy for s in w.sources)]
            self._next, self._next_known = min(times, default=None), True
        return self._next

    def due(self, now: float) -> list[tuple[NodeId, list[bytes]]]:
        """Requests to send now, one per idle source, marking their ids in flight."""
        self._next_known = False
        batches: dict[NodeId, list[bytes]] = {}
        for op_id, w in self._wants.items():
            if w.in_flight is not None or w.not_before > now:
                continue
            src = next((s for s in w.sources if s not in self._busy
                        and len(batches.get(s, ())) < self._limits.fetch_batch), None)
            if src is None:
                continue
            batches.setdefault(src, []).append(op_id)
            w.in_flight = src
        self._busy.update(batches)
        return list(batches.items())

    def received(self, source: NodeId, ids: list[bytes]) -> None:
        """``source`` answered; ``ids`` are now held (by us, from any path)."""
        self._next_known = False
        self._busy.discard(source)
        for op_id in ids:
            self._wants.pop(op_id, None)

    def release(self, source: NodeId, ids: list[bytes]) -> None:
        """``source`` answered but had no room for ``ids`` in its reply: ask again, no penalty."""
        self._next_known = False
        self._busy.discard(source)
        for op_id in ids:
            w = self._wants.get(op_id)
            if w is not None:
                w.in_flight = None

    def not_found(self, source: NodeId, ids: list[bytes]) -> None:
        """``source`` does not have ``ids`` (any more): try other sources."""
        self._next_known = False
        self._busy.discard(source)
        for op_id in ids:
            w = self._wants.get(op_id)
            if w is None:
                continue
            if source in w.sources:
                w.sources.remove(source)
            w.in_flight = None
            if not w.sources:
                del self._wants[op_id]
                self._metrics.inc("fetch_abandoned")

    def failed(self, source: NodeId, ids: list[bytes], now: float) -> None:
        """The request to ``source`` timed out or broke: back off, rotate sources."""
        self._next_known = False
        self._busy.discard(source)
        for op_id in ids:
            w = self._wants.get(op_id)
            if w is None:
                continue
            w.in_flight = None
            w.attempts += 1
            if w.attempts >= self._limits.fetch_attempts:
                del self._wants[op_id]
                self._metrics.inc("fetch_abandoned")
                continue
            if source in w.sources:
                w.sources.remove(source)
                w.sources.append(source)
            w.not_before = now + min(self._retry_max, self._retry_base * 2 ** (w.attempts - 1))
        self._metrics.inc("fetch_failures")
