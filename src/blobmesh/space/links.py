"""Links as a sans-I/O core: which connections to keep, when to dial, whom to let handshake.

Each node keeps at most one outgoing link per peer, at most ``max_links`` in all (the least
recently used one is closed for a new one).  A peer we could not reach or were refused by is
not dialed again before its exponential backoff (``probe_interval`` doubling up to
``unresponsive_backoff_max``) ends.  Inbound, a peer opens at most
:data:`MAX_INBOUND_STREAMS_PER_PEER` streams, and strangers (no current record here) share
``max_handshakes`` handshakes in progress, so a flood of them costs a constant while members
are not held up.

Decisions are taken at events only (no timers); dial backoff uses the wall clock, as it is
persisted in :class:`~blobmesh.space.membership.PeerMeta` across restarts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: node ids and settings are opaque values here
    from blobmesh.space.config import Limits, Timing
    from blobmesh.space.membership import PeerMeta
    from blobmesh.space.metrics import Metrics
    from blobmesh.transport.identity import NodeId

MAX_INBOUND_STREAMS_PER_PEER = 4


class Links:
    """The set of outgoing links in use order, dial backoff, and the inbound gate."""

    def __init__(self, timing: Timing, limits: Limits, metrics: Metrics) -> None:
        self._t = timing
        self._limits = limits
        self._metrics = metrics
        self._out: OrderedDict[NodeId, None] = OrderedDict()
        self._inbound: dict[NodeId, int] = {}
        self._handshakes = 0  # inbound handshakes in progress with strangers

    # --- outgoing ----------------------------------------------------------------------------

    def __contains__(self, peer: NodeId) -> bool:
        return peer in self._out

    def used(self, peer: NodeId) -> None:
        self._out.move_to_end(peer)

    def opened(self, peer: NodeId) -> list[NodeId]:
        """A link to ``peer`` is up; returns the links to close to stay within ``max_links``."""
        self._out[peer] = None
        self._out.move_to_end(peer)
        evict: list[NodeId] = []
        while len(self._out) > self._limits.max_links:
            old, _ = self._out.popitem(last=False)
            self._metrics.limit("links")
            evict.append(old)
        return evict

    def closed(self, peer: NodeId) -> None:
        self._out.pop(peer, None)

    @staticmethod
    def may_dial(meta: PeerMeta | None, now: float) -> bool:
        """Whether ``peer``'s backoff (if any) is over at wall-clock ``now``."""
        return meta is None or meta.backoff_until <= now

    def dial_failed(self, meta: PeerMeta, now: float) -> None:
        """Back off exponentially from a peer (or seed) we could not reach or were refused by."""
        meta.failures += 1
        delay = self._t.probe_interval * 2 ** min(meta.failures - 1, 16)
        meta.backoff_until = now + min(self._t.unresponsive_backoff_max, delay)

    @staticmethod
    def dial_ok(meta: PeerMeta | None) -> None:
        if meta is not None:
            meta.failures, meta.backoff_until = 0, 0.0

    # --- inbound -----------------------------------------------------------------------------

    def admit_stream(self, peer: NodeId, *, stranger: bool) -> str | None:
        """Take a stream ``peer`` opened to us, or say why not (then nothing is held)."""
        if self._inbound.get(peer, 0) >= MAX_INBOUND_STREAMS_PER_PEER:
            self._metrics.limit("inbound_streams")
            return "too many streams"
        if stranger and self._handshakes >= self._limits.max_handshakes:
            self._metrics.limit("handshakes")
            return "busy"
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        self._handshakes += stranger
        return None

    def handshake_over(self, *, stranger: bool) -> None:
        self._handshakes -= stranger

    def stream_closed(self, peer: NodeId) -> bool:
        """A stream of ``peer``'s ended; True if it was its last one."""
        self._inbound[peer] -= 1
        if self._inbound[peer]:
            return False
        del self._inbound[peer]
        return True

    def serving(self, peer: NodeId) -> bool:
        """Whether ``peer`` has a stream open to us."""
        return peer in self._inbound
