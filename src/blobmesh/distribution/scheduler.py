"""The swarm's scheduling decisions as sans-I/O cores.

:class:`DownloadScheduler` (one per download job) decides whom to dial, which piece to request
on which connection, when a request is late, whom to ban, when to flush and when the job has
stalled.  :class:`UploadScheduler` (one per node) decides which requested piece to serve next
and which requests to refuse because other peers hold the piece.

Neither does I/O nor reads a clock (the aioquic pattern): the adapter feeds events together
with ``now``, executes the actions they return, and calls ``handle_timer(now)`` when
``get_timer()`` says.  The asyncio swarm and the simulator (:mod:`blobmesh.sim`) are both
adapters, so the simulator measures the very decisions a node makes.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from blobmesh.distribution.peerwire import REJECT_BUSY, REJECT_ELSEWHERE
from blobmesh.distribution.picker import PiecePicker
from blobmesh.distribution.requests import RequestLedger
from blobmesh.types import Bitfield


class _Ranked(Hashable, Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


Conn = TypeVar("Conn", bound=Hashable)  # the adapter's handle of one connection
Peer = TypeVar("Peer", bound=_Ranked)  # a node id
Blob = TypeVar("Blob", bound=Hashable)

LAYER = -1  # the piece layer's slot in the request ledger
MAX_REDIRECTS = 3
OUTBOX_PIECES = 2  # pieces queued per connection: the upload scheduler decides late
UPLOAD_SLOTS = 4  # pieces on their way over all connections (see UploadScheduler)
# ... at most, while the node sends below its peak rate (``SwarmConfig.max_upload_slots``,
# ``blobmesh sim --max-upload-slots``; see docs/sim.md, "Fourth pass")
MAX_UPLOAD_SLOTS = 8
SATURATED = 0.95  # a send rate at least this part of the peak is the link's
RATE_SAMPLES = 8  # sends the send rate averages over (an EWMA of the gaps between them)
BUSY_QUEUE = 1  # requests a downloading node lets wait for its upload (see UploadScheduler)
CLAIM_TTL = 2.0  # seconds a seed's claimant may go without acknowledging a piece
# requests a claimant may have waiting at a seed and keep its claims: a download asks one peer
# for at most its pipeline (16 by default) at a time, so more is a peer asking for everything
CLAIM_PENDING = 32
UNACKED_BYTES = 4 << 20  # pieces in flight to one peer before its ``have`` s must catch up
SOURCE_FANOUT = 32  # targets of a scope expected to dial its source first (dials_source_first)


# --- actions -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Dial(Generic[Peer]):
    """Open a connection about the blob to ``peer``; report back with ``dial_ended``."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class Request(Generic[Conn]):
    """Send ``req index`` on ``conn``."""

    conn: Conn
    index: int


@dataclass(frozen=True, slots=True)
class RequestLayer(Generic[Conn]):
    """Send ``layer?`` on ``conn``."""

    conn: Conn


@dataclass(frozen=True, slots=True)
class Cancel(Generic[Conn]):
    """Send ``cancel index`` on ``conn`` (a late piece is then taken or dropped); ``late``:
    the request missed its deadline and is asked elsewhere."""

    conn: Conn
    index: int
    late: bool = False


@dataclass(frozen=True, slots=True)
class Announce(Generic[Conn]):
    """Send ``haves indices`` on ``conn``; ``indices`` None: ``have-all`` (the job is
    complete)."""

    conn: Conn
    indices: list[int] | None


@dataclass(frozen=True, slots=True)
class Close(Generic[Conn]):
    """Close ``conn`` (the scheduler has already forgotten it)."""

    conn: Conn
    reason: str


@dataclass(frozen=True, slots=True)
class Ban(Generic[Peer]):
    """Refuse ``peer`` for this blob from now on; ``kind`` labels the metric."""

    peer: Peer
    kind: str
    why: str


@dataclass(frozen=True, slots=True)
class Flush:
    """Make the pieces written so far durable."""


@dataclass(frozen=True, slots=True)
class Complete:
    """Every piece is verified and written: close the partial blob."""


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The job stalled (no progress for a while, ``reason`` says how long) or moves again."""

    stalled: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """No progress for ``stall_timeout``: the job gives up (the owner may retry)."""

    reason: str


DownloadAction = (Dial[Peer] | Request[Conn] | RequestLayer[Conn] | Cancel[Conn] | Announce[Conn]
                  | Close[Conn] | Ban[Peer] | Flush | Complete | StateChanged | Failed)


@dataclass(slots=True)
class DownloadPolicy:
    """The knobs of one download job (seconds; see ``SwarmConfig``)."""

    # Requests in flight per connection.  A request waiting in an uploader's queue pins its
    # piece there while other peers could send it now, and a downloader has many
    # connections: one each keeps its link busy (the simulator: 1 → 2.6×, 4 → 1.8× the bound)
    pipeline: int = 1
    seed_pipeline: int = 1  # ... to a peer that holds the whole blob
    max_peers: int = 8
    source_fanout: int = SOURCE_FANOUT
    peer_retry: float = 1.0
    stall_timeout: float = 30.0
    flush_interval: float = 1.0
    request_timeout: float = 6.0
    request_strikes: int = 3
    layer_asks: int = 3  # peers asked for the piece layer at once (small; the first wins)
    busy_backoff: float = 0.2  # a peer that refused a request as busy is not asked this long
    # ... and one that sent a request elsewhere (a seed: others hold the piece, or are getting
    # it), then one piece at a time: asking it for another piece at once made the source's
    # 64 connections send it 9,000 requests in the first quarter second (1,000 targets)
    elsewhere_backoff: float = 0.2
    # Pieces verified within ``announce_delay`` of the last announcement wait for the next
    # one, which goes out then or once ``announce_batch`` pieces wait: one ``haves`` names
    # them all (a piece after a quiet spell is announced at once)
    announce_delay: float = 0.0
    announce_batch: int = 1
    # The end game duplicates a request only once it is this old (seconds): in a healthy
    # swarm the first copy is on its way, and a duplicate costs a piece of somebody's upload
    # (the simulator, 300 targets: duplicating at once 1.43x the bound, never 1.39x); a
    # peer that stalls is asked elsewhere after this, not after ``request_timeout``
    endgame_after: float = 1.0


class DownloadScheduler(Generic[Conn, Peer]):
    """Every decision of one download job.

    Connections are the adapter's handles; requests belong to connections, so when one closes
    exactly its requests (the piece layer's included) are asked elsewhere at once.  Until the
    piece layer is known (:meth:`start`) the job only dials and asks for the layer.

    ``candidates()`` names the peers to dial, best first; ``free_connections()`` how many more
    connections the node may open; ``banned`` may be shared with the node's upload side.
    """

    def __init__(self, pieces: int, me: Peer, candidates: Callable[[], Sequence[Peer]],
                 now: float, policy: DownloadPolicy | None = None, *,
                 free_connections: Callable[[], int] | None = None,
                 banned: set[Peer] | None = None, rng: random.Random | None = None) -> None:
        self.pieces = pieces
        self.policy = policy or DownloadPolicy()
        self.banned: set[Peer] = banned if banned is not None else set()
        self.picker: PiecePicker[Conn] | None = None
        self.stalled = False
        self.paused = False  # a higher priority runs, or the disk is full: request nothing
        self._full = False  # the disk is full: pieces arriving cannot be stored
        self.done = False
        self._me = me
        self._candidates = candidates
        self._free = free_connections
        self._rng = rng or random.Random()
        self._plan = DialPlan[Peer](candidates, self.policy.peer_retry,
                                    4 * self.policy.max_peers, self.policy.source_fanout,
                                    self._rng, me)
        self._conns: dict[Peer, Conn] = {}  # the one connection kept per peer
        self._peer_of: dict[Conn, Peer] = {}
        self._haves: dict[Conn, Bitfield] = {}  # the peer's bitfield, kept current by its session
        self._has_layer: dict[Conn, bool] = {}
        self._dialing: set[Peer] = set()
        self._last_dial: dict[Peer, float] = {}
        self._alone_since: float | None = now  # since when the job has had no connection
        self._dial_retry_at: float | None = None
        self._ledger = RequestLedger[Conn](self.policy.request_timeout,
                                           self.policy.request_strikes)
        self._layer_conns: set[Conn] = set()  # asked for the piece layer, not yet answered
        self._layer_expired: set[Conn] = set()
        self._layer_known = False  # a valid layer arrived; ``start`` follows
        self._backoff: dict[Conn, float] = {}  # refused a request as busy: ask again then
        self._probing: set[Conn] = set()  # ... then one request at a time until a piece comes
        self._last_progress = now
        self._last_flush = now
        self._filled_at = now  # the last time every connection was given what it could take
        # Announcing: a piece goes to the peers that lack it as far as we know, and to every
        # connection it was requested on (the uploader takes our ``haves`` as the
        # acknowledgement of what it sent: ``UploadScheduler.acked``)
        self._asked: dict[int, list[Conn]] = {}  # missing piece -> connections asked for it
        self._unannounced: list[int] = []
        self._announced_at = -1e300
        self._out: list[DownloadAction[Peer, Conn]] = []
        # Connections whose last pick came up empty (performance only: most picks of a
        # swarm are empty, and ``_fill`` runs over every connection after nearly every
        # event; it does not ask the picker for these).  A pick stays empty until one of the
        # connection's pieces becomes pickable (a ``have`` on it, a lost request of a piece
        # it holds: the entry is dropped) or the picker's peers change (added, removed or
        # complete: availabilities and a seed's limit move) or the tail begins: ``_epoch``
        # moves, and every entry (its value) is stale.  In the tail, before the end game,
        # a pick may also take a piece once every missing one is in flight: such an entry
        # (``~_moved``) is stale once the end game begins (``_moved`` moves).
        self._quiet: dict[Conn, int] = {}
        self._epoch = 0
        self._moved = 0
        self._tail = False  # the picker's ``in_tail()`` when last looked at
        self._endgame = False  # ... ``in_endgame()``, looked at whenever it may begin

    # --- state -----------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    def conns(self) -> list[Conn]:
        return list(self._conns.values())

    def conn_of(self, peer: Peer) -> Conn | None:
        return self._conns.get(peer)

    def owns(self, conn: Conn) -> bool:
        """Whether ``conn`` is the connection this job keeps to its peer."""
        peer = self._peer_of.get(conn)
        return peer is not None and self._conns.get(peer) is conn

    def outstanding(self, conn: Conn) -> int:
        return self._ledger.outstanding(conn)

    # --- events ----------------------------------------------------------------------------

    def start(self, have: Bitfield, now: float) -> list[DownloadAction[Peer, Conn]]:
        """The piece layer is known and the partial blob holds ``have``."""
        self.picker = PiecePicker[Conn](have, endgame_after=self.policy.endgame_after,
                                        rng=self._rng)
        self._repick_all()
        for conn in self._layer_conns:  # the other answers are no longer owed
            self._ledger.withdrawn(conn, LAYER)
        self._layer_conns.clear()
        for conn, bf in self._haves.items():
            self.picker.add_peer(conn, bf)
        self._last_flush = now
        return self._step(now)

    def attach(self, conn: Conn, peer: Peer, have: Bitfield, has_layer: bool, outbound: bool,
               now: float) -> list[DownloadAction[Peer, Conn]]:
        """A connection finished its hello; ``have`` is its live bitfield of the peer."""
        if peer in self.banned:
            self._out.append(Close(conn, "banned"))
            return self._take()
        old = self._conns.get(peer)
        if old is not None and old is not conn:
            # Both sides dialed each other.  Both must keep the same one of the two
            # connections: the one dialed by the smaller node id.
            keep_new = outbound == (self._me < peer)
            self._out.append(Close(old if keep_new else conn, "duplicate connection"))
            if not keep_new:
                return self._take()
            self._forget(old)
        self._conns[peer] = conn
        self._peer_of[conn] = peer
        self._haves[conn] = have
        self._has_layer[conn] = has_layer or have.count() > 0
        if self.picker is not None:
            self.picker.add_peer(conn, have)
            self._repick_all()
        return self._step(now)

    def detach(self, conn: Conn, now: float) -> list[DownloadAction[Peer, Conn]]:
        """The connection ended (closed by either side)."""
        if self.owns(conn):
            self._forget(conn)
        return self._step(now)

    def dial_ended(self, peer: Peer, now: float) -> list[DownloadAction[Peer, Conn]]:
        """A dial finished, connected (``attach`` follows or came first) or not."""
        self._dialing.discard(peer)
        return self._step(now)

    def peer_has(self, conn: Conn, indices: Iterable[int],
                 now: float) -> list[DownloadAction[Peer, Conn]]:
        """The peer announced pieces (its live bitfield holds them already)."""
        picker = self.picker
        peer = self._peer_of.get(conn)  # (the most common event: owns() inlined)
        owned = peer is not None and self._conns.get(peer) is conn
        if picker is None or not owned:
            if owned:
                # it verified a piece, so it holds the layer now, whatever its hello said
                self._has_layer[conn] = True
            return self._step(now)
        have = picker.have
        wanted = False
        for index in indices:
            picker.peer_has(conn, index)
            wanted = wanted or index not in have
        if wanted:
            self._quiet.pop(conn, None)
        if self._haves[conn].is_complete():
            self._repick_all()  # (one more seed: the seeds' limit moved)
        # Every other connection was already given all it could take; news of pieces on
        # one connection can only give that connection more to do (the most common event).
        if wanted and not self.done and not self.paused:
            self._fill_conn(conn, None, now)
        return self._take()

    def refused(self, conn: Conn, index: int, reason: str,
                now: float) -> list[DownloadAction[Peer, Conn]]:
        """The peer refused a request: other peers hold the piece (``REJECT_ELSEWHERE``), its
        upload is busy (``REJECT_BUSY``), or another reason.  After either of the first two
        the piece is asked elsewhere first, the peer nothing for ``elsewhere_backoff`` or
        ``busy_backoff``, then one piece at a time until one arrives."""
        if self.owns(conn):
            self._ledger.answered(conn, index, now)
            if self.picker is not None:
                self._lost(conn, index)
                if reason in (REJECT_ELSEWHERE, REJECT_BUSY):
                    self.picker.defer(conn, index)
            if reason == REJECT_BUSY:
                self._backoff[conn] = now + self.policy.busy_backoff
                self._probing.add(conn)
            elif reason == REJECT_ELSEWHERE:
                self._backoff[conn] = now + self.policy.elsewhere_backoff
                self._probing.add(conn)
        return self._step(now)

    def piece_arrived(self, conn: Conn, index: int, now: float) -> bool:
        """A piece arrived: whether to verify and write it (False: nobody needs it now)."""
        if not self.owns(conn):
            return False
        self._ledger.answered(conn, index, now)
        picker = self.picker
        return picker is not None and index not in picker.have and not self._full

    def piece_written(self, conn: Conn, index: int, new: bool,
                      now: float) -> list[DownloadAction[Peer, Conn]]:
        """The piece verified and is written (``new``: it was not stored before)."""
        picker = self.picker
        if picker is None or self.done:
            return self._take()
        for other in picker.received(conn, index):
            if other in self._peer_of:
                self._out.append(Cancel(other, index))
                self._ledger.withdrawn(other, index)
        self._probing.discard(conn)
        if new:
            self._last_progress = now
            if self.stalled:
                self.stalled = False
                self._out.append(StateChanged(False, ""))
        self._in_endgame()  # (a piece that was not in flight may have arrived)
        if picker.complete:
            self.done = True
            self._out.extend(Announce(c, None) for c in self._haves)
            self._out.append(Complete())
            return self._take()
        self._unannounced.append(index)
        p = self.policy
        if len(self._unannounced) >= p.announce_batch or \
                now >= self._announced_at + p.announce_delay:
            self._announce(now)
        return self._step(now)

    def piece_failed(self, conn: Conn, index: int, now: float) -> list[DownloadAction[Peer, Conn]]:
        """The piece could not be stored (say, the disk is full): it may be asked again."""
        if self.picker is not None:
            self._lost(conn, index)
        return self._step(now)

    def piece_corrupt(self, conn: Conn, index: int, now: float) -> list[DownloadAction[Peer, Conn]]:
        """The piece did not match the layer: its sender is banned."""
        self._ban(conn, f"sent a corrupt piece {index}", "bad-data")
        return self._step(now)

    def layer_arrived(self, conn: Conn, valid: bool,
                      now: float) -> list[DownloadAction[Peer, Conn]]:
        """A piece layer arrived; ``valid``: it matches the blob id (``start`` follows)."""
        self._ledger.answered(conn, LAYER, now)
        self._layer_conns.discard(conn)
        if valid:
            self._layer_known = True
        elif self.owns(conn):
            self._ban(conn, "sent a piece layer that does not match the blob id", "bad-data")
        return self._step(now)

    def pause(self, now: float) -> list[DownloadAction[Peer, Conn]]:
        """Request nothing more, and withdraw what is in flight (the disk is full)."""
        self.paused = self._full = True
        for conn in list(self._peer_of):
            if self.picker is not None:
                for index in self.picker.in_flight(conn):
                    self._withdraw(conn, index)
        return self._take()

    def hold(self) -> None:
        """Request nothing more for now, keeping what is in flight (a higher priority runs)."""
        self.paused = True

    def resume(self, now: float) -> list[DownloadAction[Peer, Conn]]:
        """Go on after :meth:`pause` or :meth:`hold`; the time paused counts as no stall."""
        self.paused = self._full = False
        self._last_progress = now
        if self.stalled:
            self.stalled = False
            self._out.append(StateChanged(False, ""))
        return self._step(now)

    # --- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has something to do."""
        if self.done:
            return None
        # (the adapter asks after every event: no lists, no allocations)
        p = self.policy
        when: float | None
        t: float | None
        if self.paused:
            when = None
        elif self.stalled:
            when = self._last_progress + p.stall_timeout
        else:
            when = self._last_progress + min(p.stall_timeout, 5.0, p.stall_timeout / 2)
        if self.picker is not None:
            t = self._last_flush + p.flush_interval
            if when is None or t < when:
                when = t
        if self._unannounced:
            t = self._announced_at + p.announce_delay
            if when is None or t < when:
                when = t
        t = self._ledger.get_timer()
        if t is not None:
            # the ledger tests ``now - sent >= timeout``: wake a hair late, never a hair early
            t += 1e-6
            if when is None or t < when:
                when = t
        t = self._dial_retry_at
        if t is not None and (when is None or t < when):
            when = t
        if self.picker is not None and not self.paused:
            if self._backoff:
                t = min(self._backoff.values())
                if when is None or t < when:
                    when = t
            t = self.picker.endgame_due(self._filled_at)
            if t is not None and (when is None or t < when):
                when = t
        return when

    def handle_timer(self, now: float) -> list[DownloadAction[Peer, Conn]]:
        if self.done:
            return self._take()
        p = self.policy
        if self.picker is not None and now >= self._last_flush + p.flush_interval:
            # bound what a crash can lose to about one interval of verified pieces
            self._last_flush = now
            self._out.append(Flush())
        if self._unannounced and now >= self._announced_at + p.announce_delay:
            self._announce(now)
        self._expire(now)
        for conn in [c for c, until in self._backoff.items() if until <= now]:
            del self._backoff[conn]
        idle = now - self._last_progress
        if now >= self._last_progress + p.stall_timeout and not self.paused:
            self.done = True
            self._out.append(Failed(f"no progress for {p.stall_timeout:.0f}s from "
                                    f"{len(self._conns)} peer(s)"))
            return self._take()
        if now >= self._last_progress + min(5.0, p.stall_timeout / 2) and not self.stalled \
                and not self.paused:
            self.stalled = True
            self._out.append(StateChanged(True, f"no progress for {idle:.0f}s from "
                                                f"{len(self._conns)} peer(s)"))
        return self._step(now)

    # --- decisions -------------------------------------------------------------------------

    def _take(self) -> list[DownloadAction[Peer, Conn]]:
        out, self._out = self._out, []
        return out

    def _step(self, now: float) -> list[DownloadAction[Peer, Conn]]:
        if not self.done:
            self._dial_more(now)
            if self.picker is None:
                if not self._layer_known:
                    self._ask_layer(now)
            elif not self.paused:
                self._fill(now)
        return self._take()

    def _dial_more(self, now: float) -> None:
        p = self.policy
        if self._conns:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now
        want = p.max_peers - len(self._conns)
        if self._free is not None:
            want = min(want, self._free())
        want -= len(self._dialing)
        self._dial_retry_at = None
        if want <= 0:
            return
        retry_at: float | None = None
        plan = self._plan
        order = plan.order(now)
        # A target that does not dial the source first dials it only as a last resort: after
        # ``peer_retry`` without any connection (its own dials failing while the others join).
        # Trying it whenever the peers dialed so far refused (not joined yet, or full) had
        # the first ~1 % of a large scope's targets dial it at once, and the source refuse
        # all but ``max_connections`` of them: dials grew with N (197 at 1,000, 1,386 at
        # 10,000 targets, for 64 connections).
        # Once due, it is the first one tried.
        lonely = self._alone_since
        source = None if plan.source_first else plan.source
        due = lonely is not None and now >= lonely + p.peer_retry  # (the timer's own sum)
        if source is not None and due:
            order = [source, *order]
        for peer in order:
            if want <= 0:
                break
            if peer == self._me or peer in self._conns or peer in self._dialing or \
                    peer in self.banned:
                continue
            if peer == source and not due:
                if lonely is not None:
                    retry_at = min(retry_at or 1e300, lonely + p.peer_retry)
                continue
            last = self._last_dial.get(peer)
            if last is not None and now < last + p.peer_retry:  # (the timer's own sum)
                retry_at = min(retry_at or 1e300, last + p.peer_retry)
                continue
            self._last_dial[peer] = now
            self._dialing.add(peer)
            want -= 1
            self._out.append(Dial(peer))
        if want > 0:
            self._dial_retry_at = retry_at

    def _ask_layer(self, now: float) -> None:
        """Ask up to ``layer_asks`` peers at once, so one that never answers costs no
        deadline."""
        room = self.policy.layer_asks - len(self._layer_conns)
        if room <= 0:
            return
        # a connection that let a layer request expire is asked again only if nobody else can
        candidates = [c for c, has in self._has_layer.items()
                      if has and c not in self._layer_conns]
        candidates.sort(key=lambda c: c in self._layer_expired)
        for conn in candidates[:room]:
            self._layer_conns.add(conn)
            self._out.append(RequestLayer(conn))
            self._ledger.sent(conn, LAYER, now)

    def _fill(self, now: float) -> None:
        # downloading peers first: what they can give need not cost a seed's upload (this
        # runs after nearly every event, over every connection: what cannot be asked for
        # anything now is skipped at once, the way _fill_conn would return)
        ledger, haves, pipeline = self._ledger, self._haves, self.policy.pipeline
        room, outstanding = ledger.room, ledger.outstanding
        quiet, probing, backoff = self._quiet, self._probing, self._backoff
        self._filled_at = now  # (the end game's duplicates due by now were looked for)
        self._in_tail()
        epoch, check = self._epoch, self._check_quiet
        seeds = []
        for conn in self._peer_of:
            if haves[conn].is_complete():
                seeds.append(conn)
            elif conn in probing:
                # in its backoff: nothing; else what _fill_conn does: the backoff is over,
                # and one request at a time (the common case: one is out)
                until = backoff.get(conn)
                if (until is None or now >= until) and (n := room(conn, pipeline)):
                    if until is not None:
                        del backoff[conn]
                    if outstanding(conn) < 1:
                        self._fill_conn(conn, n, now)
            elif ((q := quiet.get(conn)) is None or check or (q != epoch and q != ~self._moved)) \
                    and (n := room(conn, pipeline)):
                self._fill_conn(conn, n, now)
        if not seeds:
            return
        to_seed = self._seed_pipeline()
        for conn in seeds:
            if conn in probing:
                until = backoff.get(conn)
                if (until is None or now >= until) and (n := room(conn, to_seed)):
                    self._fill_conn(conn, n, now)
            elif ((q := quiet.get(conn)) is None or check or (q != epoch and q != ~self._moved)) \
                    and (n := room(conn, to_seed)):
                self._fill_conn(conn, n, now)

    def _repick_all(self) -> None:
        """Every quiet connection's pick may find something now (see ``_quiet``)."""
        self._epoch += 1
        self._moved += 1

    def _in_endgame(self) -> bool:
        """The picker's ``in_endgame()``; entries of the tail before it are stale once it
        begins (a piece went in flight or arrived)."""
        assert self.picker is not None
        endgame = self.picker.in_endgame()
        if endgame and not self._endgame:
            self._moved += 1
        self._endgame = endgame
        return endgame

    def _in_tail(self) -> bool:
        """The picker's ``in_tail()``; quiet connections pick again once it begins or ends."""
        assert self.picker is not None
        tail = self.picker.in_tail()
        if tail != self._tail:
            self._tail = tail
            self._repick_all()
        return tail

    # tests: ask the picker for quiet connections too, and fail if it gives them anything
    _check_quiet = False

    def _seed_pipeline(self) -> int:
        """Requests in flight to a seed: few, so that other peers relay, unless the source is
        the only peer there is (one target: its pipeline is all that keeps the link full)."""
        p = self.policy
        return p.pipeline if self._plan.source_only else p.seed_pipeline

    def _fill_conn(self, conn: Conn, room: int | None, now: float) -> None:
        """Request up to ``room`` pieces on ``conn`` (None: what its pipeline has room for)."""
        assert self.picker is not None
        if room is None:
            # A seed's queue is shared by every downloader: a request waiting there pins its
            # piece to the seed while other peers could relay it by now.
            room = self._ledger.room(conn, self._seed_pipeline() if self._haves[conn].is_complete()
                                     else self.policy.pipeline)
            if not room:  # (the common case: a have arrived on a full pipeline)
                return
        if conn in self._probing:
            until = self._backoff.get(conn)
            if until is not None and now < until:
                return
            self._backoff.pop(conn, None)
            room = min(room, 1 - self._ledger.outstanding(conn))
            if room <= 0:
                return
        picker = self.picker
        quiet = self._quiet
        q = quiet.get(conn)
        if q is not None and (q == self._epoch or q == ~self._moved):  # (nothing to pick)
            if self._check_quiet:
                assert not picker.pick(conn, room, now), "a quiet connection's pick was not empty"
            return
        picked = picker.pick(conn, room, now)
        if not picked:
            # outside the tail a pick stays empty until the epoch moves; in the tail, until a
            # piece goes in flight; in the end game a duplicate falls due as a request ages
            # (endgame_after), so an empty pick there says nothing of a later one
            if not self._in_tail():
                quiet[conn] = self._epoch
            elif not self._in_endgame():
                quiet[conn] = ~self._moved
            elif self.policy.endgame_after > 0:
                quiet.pop(conn, None)
            else:
                quiet[conn] = self._epoch
            return
        self._in_endgame()
        asked = self._asked
        for index in picked:
            self._out.append(Request(conn, index))
            self._ledger.sent(conn, index, now)
            if (conns := asked.get(index)) is None:
                asked[index] = [conn]
            else:
                conns.append(conn)

    def _announce(self, now: float) -> None:
        """Announce the pieces verified since the last time: to each connection those its
        peer lacks as far as we know, and those we asked it for (the acknowledgement its
        upload waits for, though it holds them)."""
        pending, self._unannounced = self._unannounced, []
        self._announced_at = now
        asked = [self._asked.pop(i, ()) for i in pending]
        out = self._out
        if len(pending) == 1:  # (the common case: one piece, announced after every piece)
            index, conns = pending[0], asked[0]
            for conn, have in self._haves.items():
                if index not in have or conn in conns:
                    out.append(Announce(conn, [index]))
            return
        for conn, have in self._haves.items():
            indices = [i for i, conns in zip(pending, asked, strict=True)
                       if i not in have or conn in conns]
            if indices:
                out.append(Announce(conn, indices))

    def _expire(self, now: float) -> None:
        """Requests a connection did not answer in time are asked elsewhere."""
        for exp in self._ledger.handle_timer(now):
            for index in exp.indices:
                if index == LAYER:
                    self._layer_expired.add(exp.conn)
                    self._layer_conns.discard(exp.conn)
                    continue
                self._out.append(Cancel(exp.conn, index, late=True))
                if self.picker is not None:
                    self._lost(exp.conn, index)
            if exp.ban and self.owns(exp.conn):
                self._ban(exp.conn, f"answered none of its requests for "
                                    f"{self.policy.request_timeout:g}s, {exp.strikes} times "
                                    "in a row", "unresponsive")

    def _lost(self, conn: Conn, index: int) -> None:
        """A request is refused or lost: the piece may be picked again from its holders."""
        assert self.picker is not None
        self.picker.failed(conn, index)
        quiet = self._quiet
        if quiet:
            haves = self._haves
            for c in [c for c in quiet if c not in haves or index in haves[c]]:
                del quiet[c]

    def _withdraw(self, conn: Conn, index: int) -> None:
        self._out.append(Cancel(conn, index))
        self._ledger.withdrawn(conn, index)
        if self.picker is not None:
            self._lost(conn, index)

    def _ban(self, conn: Conn, why: str, kind: str) -> None:
        peer = self._peer_of[conn]
        self._forget(conn)
        if self.picker is not None:
            self.picker.ban(conn)
        self.banned.add(peer)
        self._out.append(Ban(peer, kind, why))
        self._out.append(Close(conn, why))

    def _forget(self, conn: Conn) -> None:
        """Drop a connection; whatever it owed us (pieces, the layer) is asked elsewhere."""
        peer = self._peer_of.pop(conn)
        if self._conns.get(peer) is conn:
            del self._conns[peer]
        self._haves.pop(conn, None)
        self._has_layer.pop(conn, None)
        self._layer_expired.discard(conn)
        self._backoff.pop(conn, None)
        self._probing.discard(conn)
        self._ledger.dropped(conn)
        if self.picker is not None:
            self.picker.remove_peer(conn)
            self._quiet.pop(conn, None)
            self._repick_all()
        self._layer_conns.discard(conn)


def dials_source_first(targets: int, fanout: int, rng: random.Random) -> bool:
    """Whether this target dials the source before anybody else: about ``fanout`` of the
    scope's ``targets`` do, the others try it last.

    What the source sends reaches the rest through those few, and its inbound dials stay
    bounded as the scope grows (every target dialing it first would have it refuse all but
    ``max_connections`` and be dialed again every ``peer_retry``).
    """
    return rng.random() * max(1, targets) < fanout


def dial_order(candidates: Sequence[Peer], sample: int, rng: random.Random) -> list[Peer]:
    """``candidates[0]`` (the source), then a random ``sample`` of the others; a target that
    does not :func:`dials_source_first` moves the source last.

    Every target is given the same list (the source, then the scope in node-id order), so
    dialing it in order would make every target dial the same few peers, which then refuse
    all but ``max_connections``.
    """
    n = len(candidates)
    if n == 0:
        return []
    return [candidates[0], *(candidates[i] for i in rng.sample(range(1, n), min(n - 1, sample)))]


class DialPlan(Generic[Peer]):
    """Whom one download job dials, best first: :func:`dial_order` of ``candidates()``, the
    source first only if :func:`dials_source_first`, drawn again every ``refresh`` seconds
    (so the work does not grow with the size of the scope)."""

    def __init__(self, candidates: Callable[[], Sequence[Peer]], refresh: float, sample: int,
                 fanout: int, rng: random.Random, me: Peer | None = None) -> None:
        self._candidates = candidates
        self._me = me
        self._refresh = refresh
        self._sample = sample
        self._fanout = fanout
        self._rng = rng
        self._order: list[Peer] | None = None
        self._at = 0.0
        self._source_first: bool | None = None
        self.source: Peer | None = None  # ``candidates()[0]`` at the last draw
        # ... and nobody else was a candidate: no peer could relay what the source sends
        self.source_only = False

    @property
    def source_first(self) -> bool:
        """Whether this job dials the source first (drawn at the first :meth:`order`)."""
        return bool(self._source_first)

    def order(self, now: float) -> list[Peer]:
        if self._order is None or now >= self._at + self._refresh:
            cands = self._candidates()
            order = dial_order(cands, self._sample, self._rng)
            if self._source_first is None:
                self._source_first = dials_source_first(len(cands) - 1, self._fanout,
                                                        self._rng)
            self.source = order[0] if order else None
            self.source_only = bool(cands) and all(c == self._me for c in cands[1:])
            self._order = order if self._source_first else [*order[1:], *order[:1]]
            self._at = now
        return self._order


# --- uploads -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Serve(Generic[Conn, Blob]):
    """Read piece ``index`` of ``blob`` (verified) and queue it on ``conn``; then report
    ``sent`` or ``read_failed``."""

    conn: Conn
    blob: Blob
    index: int


@dataclass(frozen=True, slots=True)
class Refuse(Generic[Conn]):
    """Send ``rej index reason`` on ``conn``."""

    conn: Conn
    index: int
    reason: str


@dataclass(order=True)
class _Upload(Generic[Conn]):
    # (-priority, times this piece was sent, pieces the requester holds, arrival)
    sort_key: tuple[int, int, int, int]
    conn: Conn = field(compare=False)
    index: int = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


@dataclass(slots=True)
class _Link(Generic[Conn, Blob, Peer]):
    blob: Blob
    peer: Peer
    have: Bitfield  # the peer's, kept current by its session
    last_ack: float  # when the peer last acknowledged a piece (or the connection began)
    max_unacked: int | None
    downloading: bool = False  # we download this blob from the peer too: never redirect it
    queued: int = 0  # piece uploads reserved or queued on the connection
    parked: list[_Upload[Conn]] = field(default_factory=list)
    pending: dict[int, _Upload[Conn]] = field(default_factory=dict)
    unacked: dict[int, float] = field(default_factory=dict)  # sent, not announced: index -> when


@dataclass(slots=True)
class _Served(Generic[Conn, Peer]):
    conns: set[Conn] = field(default_factory=set)
    sent: dict[int, int] = field(default_factory=dict)  # piece -> times sent
    claimed: dict[int, Conn] = field(default_factory=dict)  # piece -> first requester
    redirected: dict[tuple[Peer, int], int] = field(default_factory=dict)


def _quiet_since(link: _Link[Any, Any, Any]) -> float:
    """Since when a connection with unacknowledged pieces has acknowledged none.

    Not the age of its oldest unacknowledged piece: a slow reader behind a deep queue (a
    20 Mbit/s link shared by several uploaders, the transport's buffers before it) keeps
    acknowledging, only late, and banning it as one that does not read took its upload out
    of the swarm (the lab's heterogeneous scenario banned every slow target)."""
    return max(min(link.unacked.values()), link.last_ack)


def max_unacked(piece_size: int) -> int:
    """Pieces a connection may leave unacknowledged (``UNACKED_BYTES`` of them)."""
    return max(OUTBOX_PIECES, UNACKED_BYTES // piece_size)


class UploadScheduler(Generic[Conn, Blob, Peer]):
    """Every upload decision of one node, over all blobs and connections.

    Requests of all connections share one queue ordered by priority, then by how often the
    piece was sent already (never-sent pieces first: a seed's upload is the scarcest resource
    of a swarm), then by how many pieces the requester holds (the poorest first: a peer
    holding nothing can relay nothing, and peers that fall behind set the swarm's finish),
    then by arrival.  A seed refuses (``held by other peers``) a request for a
    piece it already gives another peer, or already gave and some other peer now holds — a
    few times per requester and piece, so nobody starves.  At most ``outbox`` pieces are
    queued per connection, so the choice of what to send next is made as late as possible.

    A downloading peer acknowledges each piece by naming it in its ``haves`` (which it sends
    for a piece to every peer it asked for it, even one that holds it), or withdraws it with
    ``cancel``: :meth:`acked`.  At most ``max_unacked`` pieces (per connection, given at
    :meth:`open`) go unacknowledged; a piece sent and not yet acknowledged counts as held by
    its receiver; a claimant that acknowledged nothing for ``claim_ttl``, or has more than
    ``CLAIM_PENDING`` requests waiting here, holds no claim (a peer that does not read,
    having asked for every piece, would have the seed refuse everybody else); and one that
    leaves a piece unacknowledged for ``send_timeout`` does not read: :meth:`handle_timer`
    closes it.

    At most ``slots`` pieces are on their way over all connections together (upload slots,
    as BitTorrent's unchoke limit): a node whose link is shared by 64 connections would
    otherwise need 64 piece times before any piece it sends is complete anywhere, and a
    swarm relays only complete pieces.

    The slots adapt to the node's send rate (as libtorrent's automatic upload slots): each
    piece sent updates an average of the gaps between sends (over about ``RATE_SAMPLES``);
    while it is longer than the shortest seen over ``saturated`` (the node sends below
    ``saturated`` of its peak rate: its pieces are held down by receivers whose downlinks
    are shared by more flows, or it had nothing to send) one more slot opens, up to
    ``max_slots``; once it sends at its peak again, one closes, down to ``slots``.

    A node that downloads the blob itself refuses (``busy``) a request of a peer it
    downloads from too while its slots are taken and ``busy_queue`` requests already wait
    for them: in a swarm
    the requester can get the piece from another of its peers now, instead of waiting here
    while they idle (a seed has no such say: it is asked only for pieces nobody else has).
    """

    def __init__(self, outbox: int = OUTBOX_PIECES, max_redirects: int = MAX_REDIRECTS,
                 slots: int | None = UPLOAD_SLOTS, claim_ttl: float = CLAIM_TTL,
                 send_timeout: float | None = None,
                 busy_queue: int | None = BUSY_QUEUE,
                 max_slots: int | None = None,
                 saturated: float = SATURATED) -> None:
        self.outbox = outbox
        self.max_redirects = max_redirects
        self.min_slots = slots
        self.max_slots = slots if slots is None or max_slots is None else max(slots, max_slots)
        self.slots = slots  # open now, between the two
        self.saturated = saturated
        self._last_sent: float | None = None
        self._gap: float | None = None  # the average gap between sends (seconds)
        self._best_gap = float("inf")  # ... the shortest it was after RATE_SAMPLES sends
        self._sends = 0
        self.claim_ttl = claim_ttl
        self.send_timeout = send_timeout
        self.busy_queue = busy_queue
        self.in_flight = 0  # pieces served and not yet sent, over all connections
        self.waiting = 0  # requests queued, neither served nor refused yet
        self._links: dict[Conn, _Link[Conn, Blob, Peer]] = {}
        self._blobs: dict[Blob, _Served[Conn, Peer]] = {}
        self._queue: list[_Upload[Conn]] = []
        self._seq = itertools.count()

    def open(self, conn: Conn, blob: Blob, peer: Peer, have: Bitfield, now: float,
             max_unacked: int | None = None) -> None:
        self._links[conn] = _Link(blob, peer, have, now, max_unacked)
        self._blobs.setdefault(blob, _Served()).conns.add(conn)

    def set_downloading(self, conn: Conn, downloading: bool) -> None:
        """Whether our download job of the blob uses this connection too."""
        link = self._links.get(conn)
        if link is not None:
            link.downloading = downloading

    def close(self, conn: Conn) -> None:
        """The connection ended: its queued uploads are dropped."""
        link = self._links.pop(conn, None)
        if link is None:
            return
        self.in_flight -= link.queued  # what it had on its way will not be reported
        self.waiting -= len(link.pending)
        for up in link.pending.values():
            up.cancelled = True
        served = self._blobs[link.blob]
        served.conns.discard(conn)
        if not served.conns:
            del self._blobs[link.blob]  # nobody asks about it any more: drop its piece state

    def serving(self, blob: Blob) -> int:
        """Connections open about ``blob``."""
        served = self._blobs.get(blob)
        return len(served.conns) if served else 0

    def wanted(self, conn: Conn, index: int, priority: int,
               now: float) -> Refuse[Conn] | None:
        """The peer requests a piece: queued, or refused at once (returned)."""
        link = self._links.get(conn)
        if link is None:
            return None
        served = self._blobs[link.blob]
        if not link.downloading:
            owner = served.claimed.get(index)
            claimant = self._links.get(owner) if owner is not None else None
            if claimant is None or owner == conn or now - claimant.last_ack > self.claim_ttl \
                    or len(claimant.pending) > CLAIM_PENDING:
                served.claimed[index] = conn
            elif self._may_redirect(served, link, index):
                return Refuse(conn, index, REJECT_ELSEWHERE)
        elif self.busy_queue is not None and self.waiting >= self.busy_queue and \
                self.slots is not None and self.in_flight >= self.slots:
            return Refuse(conn, index, REJECT_BUSY)
        self._unqueue(link, index)  # asked again: the new request replaces the old
        up = _Upload((-priority, served.sent.get(index, 0), link.have.count(),
                      next(self._seq)), conn, index)
        link.pending[index] = up
        self.waiting += 1
        heapq.heappush(self._queue, up)
        return None

    def cancelled(self, conn: Conn, index: int) -> None:
        link = self._links.get(conn)
        if link is not None:
            self._unqueue(link, index)

    def acked(self, conn: Conn, index: int, now: float) -> bool:
        """The peer announced (or withdrew) ``index``; True if that freed upload room."""
        link = self._links.get(conn)
        if link is None or link.unacked.pop(index, None) is None:
            return False
        link.last_ack = now
        self._unpark(link)
        return True

    def has_work(self) -> bool:
        return bool(self._queue)

    def next(self) -> Serve[Conn, Blob] | Refuse[Conn] | None:
        """The next upload to start, or a request to refuse; None when nothing can go now."""
        while self._queue and (self.slots is None or self.in_flight < self.slots):
            up = heapq.heappop(self._queue)
            link = self._links.get(up.conn)
            if up.cancelled or link is None:
                served = self._blobs.get(link.blob) if link is not None else None
                if served is not None and served.claimed.get(up.index) == up.conn and \
                        not served.sent.get(up.index):
                    del served.claimed[up.index]  # never sent: let the next requester have it
                continue
            served = self._blobs[link.blob]
            sent = served.sent.get(up.index, 0)
            if sent > up.sort_key[1]:
                # sent to someone else since it was queued: let never-sent pieces go first
                up.sort_key = (up.sort_key[0], sent, *up.sort_key[2:])
                heapq.heappush(self._queue, up)
                continue
            if sent and not link.downloading and self._held_elsewhere(served, up.conn, up.index) \
                    and self._may_redirect(served, link, up.index):
                self._dequeued(link, up.index)
                return Refuse(up.conn, up.index, REJECT_ELSEWHERE)
            if link.queued >= self.outbox or (
                    link.max_unacked is not None and
                    link.queued + len(link.unacked) >= link.max_unacked):
                link.parked.append(up)
                continue
            link.queued += 1
            self.in_flight += 1
            self._dequeued(link, up.index)
            return Serve(up.conn, link.blob, up.index)
        return None

    def read_failed(self, conn: Conn) -> None:
        """A :class:`Serve` could not be read (the adapter refuses the request itself)."""
        link = self._links.get(conn)
        if link is not None:
            link.queued -= 1
            self.in_flight -= 1
            self._unpark(link)

    def sent(self, conn: Conn, index: int, now: float) -> None:
        """A served piece was handed to the transport."""
        link = self._links.get(conn)
        if link is None:
            return
        link.queued -= 1
        self.in_flight -= 1
        self._rate(now)
        if index not in link.have:
            link.unacked[index] = now
        served = self._blobs[link.blob]
        served.sent[index] = served.sent.get(index, 0) + 1
        self._unpark(link)

    def _rate(self, now: float) -> None:
        """A piece was sent: update the send rate, open or close a slot."""
        last, self._last_sent = self._last_sent, now
        if last is None or self.slots is None or self.max_slots == self.min_slots:
            return
        gap = now - last
        avg = gap if self._gap is None else self._gap + (gap - self._gap) / RATE_SAMPLES
        self._gap = avg
        self._sends += 1
        if self._sends < RATE_SAMPLES:
            return
        if avg < self._best_gap:
            self._best_gap = avg
        assert self.min_slots is not None and self.max_slots is not None
        if avg * self.saturated > self._best_gap:
            self.slots = min(self.max_slots, self.slots + 1)
        else:
            self.slots = max(self.min_slots, self.slots - 1)

    def get_timer(self) -> float | None:
        """When a connection with unacknowledged pieces reaches ``send_timeout`` without
        acknowledging any."""
        if self.send_timeout is None:
            return None
        quiet = [_quiet_since(link) for link in self._links.values() if link.unacked]
        return min(quiet) + self.send_timeout if quiet else None

    def handle_timer(self, now: float) -> list[Close[Conn]]:
        """Connections that do not read: the adapter closes them (and :meth:`close` s)."""
        timeout = self.send_timeout
        if timeout is None:
            return []
        return [Close(conn, f"no piece acknowledged for {timeout:g}s")
                for conn, link in self._links.items()
                if link.unacked and now - _quiet_since(link) >= timeout]

    def times_sent(self, blob: Blob, index: int) -> int:
        served = self._blobs.get(blob)
        return served.sent.get(index, 0) if served else 0

    def _unqueue(self, link: _Link[Conn, Blob, Peer], index: int) -> None:
        """Withdraw a queued request (its heap entry is skipped when it comes up)."""
        up = link.pending.pop(index, None)
        if up is not None:
            up.cancelled = True
            self.waiting -= 1

    def _dequeued(self, link: _Link[Conn, Blob, Peer], index: int) -> None:
        """A queued request came up and was served or refused."""
        if link.pending.pop(index, None) is not None:
            self.waiting -= 1

    def _unpark(self, link: _Link[Conn, Blob, Peer]) -> None:
        for up in link.parked:
            heapq.heappush(self._queue, up)
        link.parked.clear()

    def _held_elsewhere(self, served: _Served[Conn, Peer], conn: Conn, index: int) -> bool:
        # a peer sent the piece that has not announced it yet holds it all but
        return any(index in link.have or index in link.unacked
                   for other in served.conns if other != conn
                   for link in (self._links[other],))

    def _may_redirect(self, served: _Served[Conn, Peer], link: _Link[Conn, Blob, Peer],
                      index: int) -> bool:
        key = (link.peer, index)
        n = served.redirected.get(key, 0)
        if n >= self.max_redirects:
            return False
        served.redirected[key] = n + 1
        return True


__all__ = [
    "CLAIM_PENDING",
    "CLAIM_TTL",
    "LAYER",
    "MAX_UPLOAD_SLOTS",
    "SOURCE_FANOUT",
    "UNACKED_BYTES",
    "UPLOAD_SLOTS",
    "Announce",
    "Ban",
    "Cancel",
    "Close",
    "Complete",
    "Dial",
    "DialPlan",
    "DownloadAction",
    "DownloadPolicy",
    "DownloadScheduler",
    "Failed",
    "Flush",
    "Refuse",
    "Request",
    "RequestLayer",
    "Serve",
    "StateChanged",
    "UploadScheduler",
    "dial_order",
    "dials_source_first",
    "max_unacked",
]
