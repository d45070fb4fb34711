"""Which piece to ask which peer for: rarest first, pipelined, with an end game.

Pure logic (no I/O, no clock): the swarm feeds it peer bitfields, requests, arrivals and bans,
and asks it what to request next from a given peer.  Piece sets are Python sets so that the
per-request work is set algebra in C, not loops over every piece in Python.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable
from typing import Generic, TypeVar

from blobmesh.types import Bitfield

Peer = TypeVar("Peer", bound=Hashable)


class PiecePicker(Generic[Peer]):
    """Piece selection for one blob being downloaded.

    * rarest first: among pieces the peer has and we miss, pick those held by the fewest
      peers (ties broken randomly so parallel downloaders spread over different pieces);
    * a seed (a peer holding every piece) is asked only for pieces no downloading peer holds:
      its upload is the swarm's scarcest resource;
    * each piece is requested from one peer at a time, until every missing piece is in
      flight: then *end game* allows a second request for the same piece from another peer,
      so the last pieces do not wait on one slow peer;
    * a banned peer (sent bad data) is never asked again.

    The swarm keys it by connection, not node id: a request belongs to the connection it was
    sent on, and :meth:`remove_peer` hands back exactly what that connection owed.
    """

    def __init__(self, have: Bitfield, *, endgame_copies: int = 2,
                 rng: random.Random | None = None) -> None:
        self.have = have.copy()
        self._n = have.size
        self._missing = set(range(self._n)) - set(have)
        self._avail = [0] * self._n
        self._peers: dict[Peer, set[int]] = {}
        # piece -> the peers it is requested from, in request order (so are the cancels)
        self._inflight: dict[int, dict[Peer, None]] = {}
        self._banned: set[Peer] = set()
        self._endgame_copies = endgame_copies
        self._rng = rng or random.Random()
        self._deferred: dict[Peer, set[int]] = {}  # refused by that peer: ask others first
        # A pick that found nothing finds nothing again until the peer announces a piece or
        # ``_epoch`` moves: a change that can give any peer something to pick (a piece no
        # longer in flight, a peer added, removed or complete, the end game's tail).  Most
        # picks of a swarm come up empty (every piece the peer holds is asked of another).
        self._epoch = 0
        self._empty_at: dict[Peer, int] = {}
        # ... and what the peer announced since its pick came up empty at the epoch: only
        # those pieces can be picked from it now (the pick after a ``have`` looks at them)
        self._gained: dict[Peer, list[int]] = {}

    # --- peers -----------------------------------------------------------------------------

    def add_peer(self, peer: Peer, bitfield: Bitfield) -> None:
        if bitfield.size != self._n:
            raise ValueError("peer bitfield has the wrong size")
        self.remove_peer(peer)
        pieces = set(bitfield)
        self._peers[peer] = pieces
        for i in pieces:
            self._avail[i] += 1
        self._epoch += 1  # (the end game's tail grows with the peers)

    def peer_has(self, peer: Peer, index: int) -> None:
        pieces = self._peers.get(peer)
        if pieces is None or not 0 <= index < self._n or index in pieces:
            return
        pieces.add(index)
        self._avail[index] += 1
        if self._empty_at.get(peer) == self._epoch:
            gained = self._gained.get(peer)
            if gained is None:
                self._gained[peer] = [index]
            else:
                gained.append(index)
        if len(pieces) == self._n:
            self._epoch += 1  # a seed's picks no longer leave out what this peer holds

    def remove_peer(self, peer: Peer) -> list[int]:
        """Forget a peer; returns the pieces that were in flight from it."""
        pieces = self._peers.pop(peer, None)
        if pieces is not None:
            for i in pieces:
                self._avail[i] -= 1
            self._epoch += 1
        self._empty_at.pop(peer, None)
        self._gained.pop(peer, None)
        lost = self.in_flight(peer)
        for i in lost:
            self._cancel(i, peer)
        return lost

    def defer(self, peer: Peer, index: int) -> None:
        """``peer`` sent us elsewhere for ``index``: ask it again only when nothing else."""
        self._deferred.setdefault(peer, set()).add(index)

    def ban(self, peer: Peer) -> list[int]:
        self._banned.add(peer)
        return self.remove_peer(peer)

    def is_banned(self, peer: Peer) -> bool:
        return peer in self._banned

    def peers(self) -> list[Peer]:
        return list(self._peers)

    def in_flight(self, peer: Peer) -> list[int]:
        """The pieces requested from ``peer`` and not yet received."""
        return [i for i, who in self._inflight.items() if peer in who]

    # --- picking ---------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return not self._missing

    def missing(self) -> int:
        return len(self._missing)

    def interesting(self, peer: Peer) -> bool:
        """Whether the peer holds any piece we still miss."""
        pieces = self._peers.get(peer)
        return pieces is not None and not pieces.isdisjoint(self._missing)

    def in_endgame(self) -> bool:
        """Every missing piece is in flight, and only the last few remain.

        Duplicates cost the swarm upload, so they are kept for the tail (about two pieces per
        peer), where one slow peer would otherwise hold everybody up.
        """
        return self._in_tail() and self._missing.issubset(self._inflight.keys())

    def _is_seed(self, pieces: set[int]) -> bool:
        return len(pieces) == self._n

    def _in_tail(self) -> bool:
        """Few enough pieces are missing for the end game to begin."""
        return len(self._missing) <= max(4, 2 * len(self._peers))

    def pick(self, peer: Peer, count: int = 1) -> list[int]:
        """Up to ``count`` pieces to request from ``peer`` now (marked in flight)."""
        pieces = self._peers.get(peer)
        if pieces is None or peer in self._banned or count <= 0:
            return []
        gained = self._gained.pop(peer, None)
        fresh: set[int] | None = None
        if self._empty_at.get(peer) == self._epoch:
            # nothing could be picked from it but what it announced since (it holds no
            # piece but these that is missing here and not in flight)
            if gained is None:
                return []
            new = [i for i in gained if i in self._missing and i not in self._inflight]
            if not new and not self.in_endgame():
                return []
            if len(new) == 1:  # (more, or the end game: the whole computation, whose set
                fresh = set(new)  # order the random tie breaks follow)
        if fresh is None:
            fresh = (pieces & self._missing).difference(self._inflight.keys())
        if fresh and self._is_seed(pieces):
            for other, held in self._peers.items():
                if other != peer and not self._is_seed(held):
                    fresh -= held
        deferred = self._deferred.get(peer)
        if fresh and deferred:
            fresh = (fresh - deferred) or fresh
        if fresh:
            avail, rand = self._avail, self._rng.random
            chosen = heapq.nsmallest(count, fresh, key=lambda i: (avail[i], rand()))
        elif self.in_endgame():
            chosen = [i for i in pieces & self._missing
                      if (not deferred or i not in deferred)  # in flight elsewhere anyway
                      and peer not in self._inflight[i]
                      and len(self._inflight[i]) < self._endgame_copies][:count]
        else:
            chosen = []
        if not chosen:
            self._empty_at[peer] = self._epoch
            return chosen
        # (it may hold more than was picked: what it announced since no longer says it all)
        self._empty_at.pop(peer, None)
        for i in chosen:
            self._inflight.setdefault(i, {})[peer] = None
        if self._in_tail():
            self._epoch += 1  # every missing piece may be in flight now: the end game
        return chosen

    def received(self, peer: Peer, index: int) -> list[Peer]:
        """A verified piece arrived; returns other peers whose duplicate request to cancel."""
        self.have.add(index)
        self._missing.discard(index)
        for d in self._deferred.values():
            d.discard(index)
        if self._in_tail():
            self._epoch += 1
        return [p for p in self._inflight.pop(index, {}) if p != peer]

    def failed(self, peer: Peer, index: int) -> None:
        """A request was refused or lost: the piece can be picked again."""
        self._cancel(index, peer)

    def _cancel(self, index: int, peer: Peer) -> None:
        who = self._inflight.get(index)
        if who is not None and peer in who:
            del who[peer]
            # Only a peer holding ``index`` can pick something now: the others' picks are
            # what they were (the end game ending with it gives them nothing either).  Not an
            # epoch: each refusal or lost request made every connection pick again.
            empty_at = self._empty_at
            if empty_at:
                for other, pieces in self._peers.items():
                    if index in pieces:
                        empty_at.pop(other, None)
            if not who:
                del self._inflight[index]
