"""Which piece to ask which peer for: rarest first, pipelined, with an end game.

Pure logic (no I/O, no clock): the swarm feeds it peer bitfields, requests, arrivals and bans,
and asks it what to request next from a given peer.

A pick costs about ``log(pieces)`` per piece it returns or skips, not a pass over the pieces:
every peer keeps a heap of the pieces it could be asked for, keyed by availability and a random
rank drawn per piece when the picker starts (the tie break).  Entries go stale as pieces
arrive, go in flight or gain holders; a pick drops or re-keys them as they come up, and a
piece whose request is lost goes back into its holders' heaps.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from blobmesh.types import Bitfield

Peer = TypeVar("Peer", bound=Hashable)


class PiecePicker(Generic[Peer]):
    """Piece selection for one blob being downloaded.

    * rarest first: among pieces the peer has and we miss, pick those held by the fewest
      peers (ties broken by a random rank per piece, drawn by each picker, so parallel
      downloaders spread over different pieces);
    * a seed (a peer holding every piece) is asked only for pieces no downloading peer holds:
      its upload is the swarm's scarcest resource;
    * each piece is requested from one peer at a time, until every missing piece is in
      flight: then *end game* allows a second request for the same piece from another peer,
      so the last pieces do not wait on one slow peer — once its last request is
      ``endgame_after`` seconds old (0: at once; a duplicate costs the swarm a piece of
      upload, and in a healthy swarm the first copy is on its way);
    * a piece a peer sent us elsewhere for (:meth:`defer`) is asked of it only when it has
      nothing else for us;
    * a banned peer (sent bad data) is never asked again.

    The swarm keys it by connection, not node id: a request belongs to the connection it was
    sent on, and :meth:`remove_peer` hands back exactly what that connection owed.
    """

    def __init__(self, have: Bitfield, *, endgame_copies: int = 2,
                 endgame_after: float = 0.0, rng: random.Random | None = None) -> None:
        self.have = have.copy()
        n = self._n = have.size
        self._missing = set(range(n)) - set(have)
        self._miss = _mask(self._missing)  # the same, as a bit mask (bit i: piece i)
        self._all = (1 << n) - 1
        rank = list(range(n))
        (rng or random.Random()).shuffle(rank)
        # A piece's key: availability × n + its rank; ``_of_rank`` maps a key back to the
        # piece (``key % n`` is the rank).  Unique keys: heaps of plain ints, compared in C.
        self._key = rank
        self._of_rank = [0] * n
        for i, r in enumerate(rank):
            self._of_rank[r] = i
        # per peer: the pieces it holds, as a bit mask (a set of 128 ints is 8 KiB, the mask
        # 44 B: a simulated fleet of 10,000 nodes holds some 200,000 of them)
        self._peers: dict[Peer, int] = {}
        self._seeds = 0  # peers holding every piece
        # per peer: keys of the pieces it may be asked for (missing, not in flight), some
        # stale; None: to be built at its next pick (availabilities fell: keys too high)
        self._heaps: dict[Peer, list[int] | None] = {}
        # piece -> the peers it is requested from (and when), in request order (so are the
        # cancels)
        self._inflight: dict[int, dict[Peer, float]] = {}
        self._banned: set[Peer] = set()
        self._endgame_copies = endgame_copies
        self._endgame_after = endgame_after
        self._deferred: dict[Peer, set[int]] = {}  # refused by that peer: ask others first

    # --- peers -----------------------------------------------------------------------------

    def add_peer(self, peer: Peer, bitfield: Bitfield) -> None:
        if bitfield.size != self._n:
            raise ValueError("peer bitfield has the wrong size")
        self.remove_peer(peer)
        n, key = self._n, self._key
        pieces = 0
        for i in bitfield:
            key[i] += n
            pieces |= 1 << i
        self._peers[peer] = pieces
        if pieces == self._all:
            self._seeds += 1
        self._heaps[peer] = None

    def peer_has(self, peer: Peer, index: int) -> None:
        pieces = self._peers.get(peer)
        if pieces is None or not 0 <= index < self._n or pieces >> index & 1:
            return
        pieces |= 1 << index
        self._peers[peer] = pieces
        key = self._key[index] + self._n
        self._key[index] = key
        if pieces == self._all:
            self._seeds += 1
        heap = self._heaps[peer]
        if heap is not None and index in self._missing and index not in self._inflight:
            heapq.heappush(heap, key)

    def remove_peer(self, peer: Peer) -> list[int]:
        """Forget a peer; returns the pieces that were in flight from it."""
        pieces = self._peers.pop(peer, None)
        if pieces is not None:
            n, key = self._n, self._key
            for i in _bits(pieces):
                key[i] -= n
            if pieces == self._all:
                self._seeds -= 1
            del self._heaps[peer]
            for other in self._heaps:  # (their keys of its pieces are too high now)
                self._heaps[other] = None
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
        return pieces is not None and pieces & self._miss != 0

    def in_endgame(self) -> bool:
        """Every missing piece is in flight, and only the last few remain.

        Duplicates cost the swarm upload, so they are kept for the tail (about two pieces per
        peer), where one slow peer would otherwise hold everybody up.
        """
        return self._in_tail() and self._missing.issubset(self._inflight.keys())

    def in_tail(self) -> bool:
        """Few enough pieces are missing for the end game to begin (a pick may then take a
        piece in flight elsewhere, so an empty pick says nothing of the next one)."""
        return self._in_tail()

    def endgame_due(self, after: float) -> float | None:
        """The first moment later than ``after`` at which the end game may duplicate a
        request (the newest request of a piece with a copy to spare turns ``endgame_after``
        old), or None.  (Strictly later: what was due by ``after`` the caller has tried.)"""
        if self._endgame_after <= 0 or not self.in_endgame():
            return None
        copies, inflight, wait = self._endgame_copies, self._inflight, self._endgame_after
        due = [t for i in self._missing if len(inflight[i]) < copies
               for t in (max(inflight[i].values()) + wait,) if t > after]
        return min(due) if due else None

    def _in_tail(self) -> bool:
        """Few enough pieces are missing for the end game to begin."""
        return len(self._missing) <= max(4, 2 * len(self._peers))

    def _heap(self, peer: Peer, pieces: int) -> list[int]:
        heap = self._heaps[peer]
        if heap is None:
            inflight = self._inflight
            heap = [self._key[i] for i in _bits(pieces & self._miss) if i not in inflight]
            heapq.heapify(heap)
            self._heaps[peer] = heap
        return heap

    def pick(self, peer: Peer, count: int = 1, now: float = 0.0) -> list[int]:
        """Up to ``count`` pieces to request from ``peer`` at ``now`` (marked in flight)."""
        pieces = self._peers.get(peer)
        if pieces is None or peer in self._banned or count <= 0:
            return []
        heap = self._heap(peer, pieces)
        n, key, of_rank = self._n, self._key, self._of_rank
        missing, inflight = self._missing, self._inflight
        # a seed: only pieces no downloading peer holds (held by the seeds alone)
        limit = (self._seeds + 1) * n if pieces == self._all else None
        if (not heap or (limit is not None and heap[0] >= limit)) and not self._in_tail():
            return []  # (most picks of a swarm: nothing here, and no end game)
        deferred = self._deferred.get(peer)
        chosen: list[int] = []
        put_off: list[int] = []  # deferred here: taken only if nothing else is
        pop, push = heapq.heappop, heapq.heappush
        while heap and len(chosen) < count:
            k = heap[0]
            if limit is not None and k >= limit:
                break  # (keys only grow while they wait: the rest are held elsewhere too)
            pop(heap)
            i = of_rank[k % n]
            if i not in missing or i in inflight:
                continue  # (a piece whose request is lost goes back in: _cancel)
            if key[i] != k:
                push(heap, key[i])  # it gained holders since it was pushed
                continue
            if i in chosen or k in put_off:
                continue  # (a piece back from _cancel may be in twice)
            if deferred and i in deferred:
                put_off.append(k)
            else:
                chosen.append(i)
        if not chosen and put_off:
            chosen = [of_rank[k % n] for k in put_off[:count]]
            put_off = put_off[count:]
        for k in put_off:
            push(heap, k)
        if not chosen and self.in_endgame():
            # (a set of them, iterated in its order: the order the pinned simulator runs had)
            wait = self._endgame_after
            chosen = [i for i in {j for j in missing if pieces >> j & 1}
                      if (not deferred or i not in deferred)  # in flight elsewhere anyway
                      and peer not in inflight[i]
                      and len(inflight[i]) < self._endgame_copies
                      and (wait <= 0 or max(inflight[i].values()) + wait <= now)][:count]
        for i in chosen:
            inflight.setdefault(i, {})[peer] = now
        return chosen

    def received(self, peer: Peer, index: int) -> list[Peer]:
        """A verified piece arrived; returns other peers whose duplicate request to cancel."""
        self.have.add(index)
        self._missing.discard(index)
        self._miss &= ~(1 << index)
        for d in self._deferred.values():
            d.discard(index)
        return [p for p in self._inflight.pop(index, {}) if p != peer]

    def failed(self, peer: Peer, index: int) -> None:
        """A request was refused or lost: the piece can be picked again."""
        self._cancel(index, peer)

    def _cancel(self, index: int, peer: Peer) -> None:
        who = self._inflight.get(index)
        if who is not None and peer in who:
            del who[peer]
            if not who:
                del self._inflight[index]
                if index in self._missing:  # pickable again from every peer holding it
                    k = self._key[index]
                    for other, pieces in self._peers.items():
                        heap = self._heaps[other]
                        if heap is not None and pieces >> index & 1:
                            heapq.heappush(heap, k)


def _mask(indices: Iterable[int]) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


def _bits(mask: int) -> Iterator[int]:
    """The set bits of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
