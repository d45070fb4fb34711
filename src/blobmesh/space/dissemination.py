"""Dissemination as a sans-I/O core: when and with whom to gossip, whom to push to, what to fetch.

* Anti-entropy rounds every ``gossip_interval`` (jittered ±25 %) with ``gossip_fanout`` alive
  peers (or the seeds while we know nobody); a round that brings news brings the next one
  forward to a quarter of the interval, so a joining node converges fast and an idle space
  costs one exchange per interval.
* A new op or record is pushed at once to ``publish_fanout`` peers, ``relay_fanout`` of which
  forward it once to their own peers (see :meth:`Dissemination.announce`).
* Wanted op ids go to the fetch queue (:mod:`~blobmesh.space.fetch`); ids we refused are not
  fetched again for ``rejected_op_ttl`` or until their author becomes a member.

:meth:`Dissemination.handle_timer` returns :class:`GossipWith` and :class:`FetchFrom` actions,
due at :meth:`Dissemination.get_timer`; times are the caller's monotonic clock.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from blobmesh.space.fetch import FetchQueue

if TYPE_CHECKING:  # annotations only: node ids and settings are opaque values here
    from blobmesh.space.config import Limits, Timing
    from blobmesh.space.metrics import Metrics
    from blobmesh.transport.identity import NodeId


@dataclass(frozen=True, slots=True)
class GossipWith:
    """Run one anti-entropy round with ``peer``; report its end with ``round_over``."""

    peer: NodeId


@dataclass(frozen=True, slots=True)
class Push:
    """Push ``raws`` (signed records or ops) to ``peer``, asking it to relay them if ``relay``."""

    what: Literal["records", "ops"]
    peer: NodeId
    raws: list[bytes]
    relay: bool


@dataclass(frozen=True, slots=True)
class FetchFrom:
    """Request ``ids`` from ``peer``; report the outcome to :attr:`Dissemination.fetch`."""

    peer: NodeId
    ids: list[bytes]


Action = GossipWith | FetchFrom


class PeerView(Protocol):
    """What dissemination reads of membership (in-memory state, no I/O)."""

    def alive_peers(self) -> list[NodeId]:
        """Peers with a live record that answer, not us, in a stable order (by node id): the
        random choices among them are then the same for the same seed."""

    def seed_ids(self) -> list[NodeId]: ...

    def known_records(self) -> int:
        """Records held, ours included."""

    def active(self) -> bool:
        """False once we left the space."""


class Dissemination:
    """Gossip schedule, push targets, the fetch queue and the memory of refused ops."""

    def __init__(self, timing: Timing, limits: Limits, view: PeerView, *, rng: random.Random,
                 metrics: Metrics) -> None:
        self._t = timing
        self._limits = limits
        self._view = view
        self._rng = rng
        self._metrics = metrics
        self.fetch = FetchQueue(limits, retry_base=timing.fetch_retry_base,
                                retry_max=timing.fetch_retry_max, metrics=metrics)
        self._gossiping: set[NodeId] = set()
        self._last_round = 0.0
        self._period = timing.gossip_interval
        self._next_round = float("inf")
        # refused op id -> (do not fetch before, the author who was no member then)
        self._rejected: OrderedDict[bytes, tuple[float, NodeId | None]] = OrderedDict()

    def start(self, now: float) -> None:
        """The first round is one (jittered) interval from ``now``."""
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        self._last_round = now
        self._period = self._t.gossip_interval * self._rng.uniform(0.75, 1.25)
        self._next_round = now + self._period

    def pick_alive(self, k: int, prefer: Iterable[NodeId] = (),
                   exclude: NodeId | None = None) -> list[NodeId]:
        """Up to ``k`` alive peers other than ``exclude``, in random order, those of ``prefer``
        that are alive first.  Costs O(k + len(prefer)), not O(peers): a node knowing 10,000
        peers gossips several times a second."""
        alive = self._view.alive_peers()
        live = set(alive[i] for p in set(prefer)
                   if (i := bisect.bisect_left(alive, p)) < len(alive) and alive[i] == p)
        first = sorted(live - {exclude})
        self._rng.shuffle(first)
        need = max(0, k - len(first))
        # the sample may hold the preferred and the excluded: draw that many more
        drawn = self._rng.sample(alive, min(len(alive), need + len(first) + 1))
        rest = [p for p in drawn if p not in live and p != exclude][:need]
        return (first + rest)[:k]

    # --- gossip ------------------------------------------------------------------------------

    def begin_round(self, peer: NodeId) -> bool:
        """Whether a round with ``peer`` may start now (a second session would replace the
        running one at the peer)."""
        if peer in self._gossiping:
            return False
        self._gossiping.add(peer)
        return True

    def round_over(self, peer: NodeId) -> None:
        self._gossiping.discard(peer)

    def news(self) -> None:
        """New records or ops arrived: converging, so the next round comes sooner."""
        self._next_round = min(self._next_round, self._last_round + self._period / 4)

    # --- push --------------------------------------------------------------------------------

    def announce(self, what: Literal["records", "ops"], raws: list[bytes],
                 exclude: NodeId | None, *, in_flight: int, relayers: int | None = None,
                 prefer: Iterable[NodeId] = ()) -> list[Push]:
        """Pushes of new records or ops to up to ``publish_fanout`` peers.

        ``relayers`` of them (default ``relay_fanout``) forward what is new to them once to
        their own peers, reaching nodes we do not know; forwarded pushes are not forwarded
        again, so an item costs about ``(1 + relay_fanout) * peers`` pushes, never a cascade.
        Peers in ``prefer`` come first, so they are the relayers.  Nothing if ``in_flight``
        pushes and these would exceed ``max_pushes`` (gossip delivers them then).
        """
        n = self._t.relay_fanout if relayers is None else relayers
        targets = self.pick_alive(self._t.publish_fanout, prefer, exclude)
        if in_flight + len(targets) > self._limits.max_pushes:
            self._metrics.limit("pushes")
            return []
        return [Push(what, p, raws, i < n) for i, p in enumerate(targets)]

    # --- fetch -------------------------------------------------------------------------------

    def want(self, peer: NodeId, ids: list[bytes], now: float) -> None:
        """``peer`` has ops we lack: fetch those worth fetching."""
        wanted = [i for i in ids if self._worth_fetching(i, now)]
        if wanted:
            self.news()
            self.fetch.add(wanted, peer)

    def refused(self, op_id: bytes, author: NodeId | None, now: float) -> None:
        """We refused op ``op_id``: do not fetch it again for a while (peers keep offering ops
        we refuse, e.g. by an author who left), or until ``author`` becomes a member."""
        self._rejected[op_id] = (now + self._t.rejected_op_ttl, author)
        self._rejected.move_to_end(op_id)
        while len(self._rejected) > self._limits.rejected_ops:
            self._rejected.popitem(last=False)

    def member_joined(self, node: NodeId) -> None:
        """``node``'s ops count now: fetch them at the next round."""
        for op_id in [i for i, (_, author) in self._rejected.items() if author == node]:
            del self._rejected[op_id]

    def _worth_fetching(self, op_id: bytes, now: float) -> bool:
        entry = self._rejected.get(op_id)
        if entry is None:
            return True
        if entry[0] > now:
            return False
        del self._rejected[op_id]  # retry: what it depends on may have arrived meanwhile
        return True

    # --- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float:
        due = self.fetch.next_due()
        return self._next_round if due is None else min(due, self._next_round)

    def handle_timer(self, now: float) -> list[Action]:
        out: list[Action] = [FetchFrom(peer, ids) for peer, ids in self.fetch.due(now)]
        if now >= self._next_round:
            self._schedule(now)
            if self._view.active():
                peers = self.pick_alive(self._t.gossip_fanout)
                if not peers or self._view.known_records() <= 1:
                    peers = [*peers, *self._view.seed_ids()]
                out.extend(GossipWith(p) for p in peers if p not in self._gossiping)
        return out
