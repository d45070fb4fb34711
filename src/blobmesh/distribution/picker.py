"""Which piece to ask which peer for: rarest first, pipelined, with an end game.

Pure logic (no I/O, no clock): the swarm feeds it peer bitfields, requests, arrivals and bans,
and asks it what to request next from a given peer.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Generic, TypeVar

from blobmesh.store.bitfield import Bitfield

Peer = TypeVar("Peer", bound=Hashable)


class PiecePicker(Generic[Peer]):
    """Piece selection for one blob being downloaded.

    * rarest first: among pieces the peer has and we miss, pick those held by the fewest
      peers (ties broken randomly so parallel downloaders spread over different pieces);
    * each piece is requested from one peer at a time, until every missing piece is in
      flight: then *end game* allows a second request for the same piece from another peer,
      so the last pieces do not wait on one slow peer;
    * a banned peer (sent bad data) is never asked again.
    """

    def __init__(self, have: Bitfield, *, endgame_copies: int = 2,
                 rng: random.Random | None = None) -> None:
        self.have = have.copy()
        self._n = have.size
        self._avail = [0] * self._n
        self._peers: dict[Peer, Bitfield] = {}
        self._inflight: dict[int, set[Peer]] = {}
        self._banned: set[Peer] = set()
        self._endgame_copies = endgame_copies
        self._rng = rng or random.Random()

    # --- peers -----------------------------------------------------------------------------

    def add_peer(self, peer: Peer, bitfield: Bitfield) -> None:
        if bitfield.size != self._n:
            raise ValueError("peer bitfield has the wrong size")
        self.remove_peer(peer)
        self._peers[peer] = bitfield.copy()
        for i in bitfield:
            self._avail[i] += 1

    def peer_has(self, peer: Peer, index: int) -> None:
        bf = self._peers.get(peer)
        if bf is None or not 0 <= index < self._n or index in bf:
            return
        bf.add(index)
        self._avail[index] += 1

    def remove_peer(self, peer: Peer) -> list[int]:
        """Forget a peer; returns the pieces that were in flight from it."""
        bf = self._peers.pop(peer, None)
        if bf is not None:
            for i in bf:
                self._avail[i] -= 1
        lost = [i for i, who in self._inflight.items() if peer in who]
        for i in lost:
            self._cancel(i, peer)
        return lost

    def ban(self, peer: Peer) -> list[int]:
        self._banned.add(peer)
        return self.remove_peer(peer)

    def is_banned(self, peer: Peer) -> bool:
        return peer in self._banned

    def peers(self) -> list[Peer]:
        return list(self._peers)

    def peer_bitfield(self, peer: Peer) -> Bitfield | None:
        return self._peers.get(peer)

    # --- picking ---------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.have.is_complete()

    def missing(self) -> int:
        return self._n - self.have.count()

    def interesting(self, peer: Peer) -> bool:
        """Whether the peer holds any piece we still miss."""
        bf = self._peers.get(peer)
        return bf is not None and any(i not in self.have for i in bf)

    def in_endgame(self) -> bool:
        return all(i in self.have or i in self._inflight for i in range(self._n))

    def pick(self, peer: Peer, count: int = 1) -> list[int]:
        """Up to ``count`` pieces to request from ``peer`` now (marked in flight)."""
        bf = self._peers.get(peer)
        if bf is None or peer in self._banned or count <= 0:
            return []
        fresh = [i for i in bf if i not in self.have and i not in self._inflight]
        if fresh and bf.count() == self._n:
            # A seed's upload is the swarm's scarcest resource: ask it only for what no
            # downloading peer holds.  (Pieces others hold come from them; the end game
            # still falls back on the seed if they are slow.)
            elsewhere = self._held_by_non_seeds(peer)
            fresh = [i for i in fresh if i not in elsewhere]
        if fresh:
            self._rng.shuffle(fresh)
            fresh.sort(key=self._avail.__getitem__)  # stable: random among equal rarity
            chosen = fresh[:count]
        elif self.in_endgame():
            chosen = [i for i in bf if i not in self.have
                      and peer not in self._inflight.get(i, ())
                      and len(self._inflight.get(i, ())) < self._endgame_copies][:count]
        else:
            chosen = []
        for i in chosen:
            self._inflight.setdefault(i, set()).add(peer)
        return chosen

    def _held_by_non_seeds(self, exclude: Peer) -> set[int]:
        held: set[int] = set()
        for p, bf in self._peers.items():
            if p != exclude and bf.count() < self._n:
                held.update(bf)
        return held

    def received(self, peer: Peer, index: int) -> list[Peer]:
        """A verified piece arrived; returns other peers whose duplicate request to cancel."""
        self.have.add(index)
        others = [p for p in self._inflight.pop(index, set()) if p != peer]
        return others

    def failed(self, peer: Peer, index: int) -> None:
        """A request was refused or lost: the piece can be picked again."""
        self._cancel(index, peer)

    def inflight_from(self, peer: Peer) -> list[int]:
        return [i for i, who in self._inflight.items() if peer in who]

    def _cancel(self, index: int, peer: Peer) -> None:
        who = self._inflight.get(index)
        if who is not None:
            who.discard(peer)
            if not who:
                del self._inflight[index]

