"""Deadlines on piece requests: which connection is too slow to answer, and who to ban.

Sans-I/O (the caller passes ``now``): the swarm records every request it sends on a
connection and every answer (a piece or a refusal) it gets.  A connection that has requests
outstanding and has answered nothing for ``timeout`` seconds has *expired*: its requests are
handed back to be asked elsewhere, and it is *snubbed* (at most one request in flight) until it
answers again.  After ``max_strikes`` expiries in a row it is to be banned for the blob.
Requests belong to connections, not peers, so two connections to one peer never mix.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Conn = TypeVar("Conn", bound=Hashable)


@dataclass(slots=True)
class _Track:
    outstanding: dict[int, float] = field(default_factory=dict)  # index -> sent at
    waiting_since: float = 0.0  # the later of the first outstanding request and last answer
    strikes: int = 0


@dataclass(frozen=True, slots=True)
class Expired(Generic[Conn]):
    """A connection missed its deadline: re-request ``indices`` elsewhere."""

    conn: Conn
    indices: tuple[int, ...]
    strikes: int
    ban: bool


class RequestLedger(Generic[Conn]):
    """Outstanding requests per connection with an answer deadline (see the module doc)."""

    def __init__(self, timeout: float, max_strikes: int = 3) -> None:
        self.timeout = timeout
        self.max_strikes = max_strikes
        self._tracks: dict[Conn, _Track] = {}
        # (deadline, seq, conn), lazily pruned: a connection's deadline only moves later, so
        # an entry is current iff it equals its track's deadline (get_timer per event is O(1))
        self._deadlines: list[tuple[float, int, Conn]] = []
        self._seq = itertools.count()

    def _push(self, conn: Conn, track: _Track) -> None:
        heapq.heappush(self._deadlines, (track.waiting_since + self.timeout, next(self._seq),
                                         conn))

    def sent(self, conn: Conn, index: int, now: float) -> None:
        track = self._tracks.setdefault(conn, _Track())
        if not track.outstanding:
            track.waiting_since = now
            self._push(conn, track)
        track.outstanding[index] = now

    def answered(self, conn: Conn, index: int, now: float) -> None:
        """A piece or a refusal arrived on ``conn`` (late answers count as life too)."""
        track = self._tracks.get(conn)
        if track is None:
            return
        track.outstanding.pop(index, None)
        moved = now != track.waiting_since
        track.waiting_since = now
        track.strikes = 0
        if track.outstanding and moved:
            self._push(conn, track)

    def withdrawn(self, conn: Conn, index: int) -> None:
        """We cancelled the request ourselves (end game): no answer is owed."""
        track = self._tracks.get(conn)
        if track is not None:
            track.outstanding.pop(index, None)

    def dropped(self, conn: Conn) -> list[int]:
        """The connection is gone; returns its outstanding requests."""
        track = self._tracks.pop(conn, None)
        return sorted(track.outstanding) if track else []

    def outstanding(self, conn: Conn) -> int:
        track = self._tracks.get(conn)
        return len(track.outstanding) if track else 0

    def snubbed(self, conn: Conn) -> bool:
        """Whether ``conn`` missed a deadline and has not answered since."""
        track = self._tracks.get(conn)
        return track is not None and track.strikes > 0

    def room(self, conn: Conn, pipeline: int) -> int:
        """How many more requests ``conn`` may have in flight now."""
        track = self._tracks.get(conn)  # (once per connection on nearly every event)
        if track is None:
            return pipeline
        return max(0, (1 if track.strikes > 0 else pipeline) - len(track.outstanding))

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` has something to do, or None."""
        heap = self._deadlines
        while heap:
            when, _, conn = heap[0]
            track = self._tracks.get(conn)
            if track is not None and track.outstanding and \
                    track.waiting_since + self.timeout == when:
                return when
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> list[Expired[Conn]]:
        """Connections past their deadline; their requests are no longer outstanding."""
        out: list[Expired[Conn]] = []
        for conn, track in self._tracks.items():
            if track.outstanding and now - track.waiting_since >= self.timeout:
                track.strikes += 1
                indices = tuple(sorted(track.outstanding))
                track.outstanding.clear()
                out.append(Expired(conn, indices, track.strikes,
                                   track.strikes >= self.max_strikes))
        return out


__all__ = ["Expired", "RequestLedger"]
