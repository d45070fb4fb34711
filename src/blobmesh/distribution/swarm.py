"""The swarm engine: serves pieces to, and downloads pieces from, many peers at once.

One :class:`SwarmEngine` per node.  It answers every incoming ``blobmesh-swarm/1`` stream for
a blob it holds (complete or partial) and runs :class:`DownloadJob` s, each of which talks to
several peers, picks pieces rarest first with a pipeline per peer, verifies every piece before
it is stored, and bans a peer that sends bad data or leaves its requests unanswered.  Uploads
from all peers share one priority queue, and downloads pass a priority gate, so
higher-priority work gets bandwidth first; every connection has its own send queue, so a peer
that does not read holds up nobody else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import heapq
import itertools
import logging
import random
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field

from blobmesh.distribution.model import SOURCES_REPORTED, Priority, TargetState
from blobmesh.distribution.peerwire import (
    PROTOCOL,
    REJECT_ELSEWHERE,
    Event,
    LayerArrived,
    LayerWanted,
    PeerHas,
    PeerHello,
    PeerLeft,
    PieceArrived,
    PieceRefused,
    PieceWanted,
    SwarmSession,
    WantCancelled,
    peek_hello,
)
from blobmesh.distribution.picker import PiecePicker
from blobmesh.distribution.ratelimit import TokenBucket
from blobmesh.distribution.requests import RequestLedger
from blobmesh.distribution.scheduler import SOURCE_FANOUT, DialPlan
from blobmesh.errors import (
    BadPeerDataError,
    BlobmeshError,
    BlobNotFoundError,
    CorruptBlobError,
    ProtocolError,
    StoreError,
    StoreFullError,
    TransferError,
    TransportError,
    VerificationError,
)
from blobmesh.hashing import BlobId, PieceLayer
from blobmesh.store import Bitfield, LeaseId, PartialBlob, PieceReader, Store
from blobmesh.store.piece_index import PieceIndex, fill_from_index
from blobmesh.tasks import TaskOwner
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
CLAIM_TTL = 2.0  # seconds a seed's claimant may go without acknowledging a piece
OUTBOX_PIECES = 2  # pieces queued per connection: the upload scheduler decides late
UNACKED_BYTES = 4 << 20  # pieces in flight to one peer before its ``have`` s must catch up
MAX_OUTBOX = 8192  # messages queued per connection before it counts as not reading
HELLO_TIMEOUT = 10.0
NOT_READING = "peer does not read"
LAYER = -1  # the piece layer's slot in the request ledger
LAYER_ASKS = 3  # peers asked for the piece layer at once
DISK_HEADROOM = 1 << 20  # free bytes kept for metadata when pieces fill a disk


class BanKind(enum.StrEnum):
    """Why a peer was banned for a blob (the label of the ban metric)."""

    BAD_DATA = "bad-data"  # a piece or piece layer that failed verification
    UNRESPONSIVE = "unresponsive"  # let its requests expire again and again
    NOT_READING = "not-reading"  # read nothing we sent for ``send_timeout``


@dataclass(slots=True)
class SwarmConfig:
    """Node-wide swarm limits (rates in bytes/s, 0 = unlimited)."""

    pipeline: int = 16  # requests in flight per peer
    max_peers_per_blob: int = 8
    upload_workers: int = 4  # disk reads in parallel; sends are per connection
    upload_rate: float = 0.0
    download_rate: float = 0.0
    max_connections: int = 64  # swarm connections over all blobs, in and out
    peer_retry: float = 1.0  # seconds before dialing a peer that failed again
    stall_timeout: float = 30.0
    flush_interval: float = 1.0  # make received pieces durable (and resumable) this often
    request_timeout: float = 6.0  # a connection answering none of its requests this long
    request_strikes: int = 3  # ... this many times in a row is banned for the blob
    send_timeout: float = 20.0  # a peer that reads nothing we send this long is banned
    disk_retry: float = 1.0  # seconds between checks for free space while the disk is full


@dataclass(slots=True)
class JobProgress:
    """What a download job reports to its owner."""

    bytes_done: int
    bytes_total: int
    pieces_done: int
    pieces_total: int
    peers: int
    rate: float
    state: TargetState = TargetState.TRANSFERRING
    reason: str = ""
    sources: tuple[NodeId, ...] = ()  # peers with requests in flight, the busiest first


PeerSource = Callable[[], Iterable[NodeId]]
ProgressCallback = Callable[[JobProgress], None]


class _Conn:
    """One stream with one peer about one blob.

    Everything we send goes through a bounded outbox drained by the connection's own writer
    task, so a peer that does not read blocks nobody but itself.  A downloading peer
    acknowledges each piece we send with its ``have`` (or withdraws it with ``cancel``); at
    most ``UNACKED_BYTES`` of pieces go unacknowledged, and a peer that leaves a send or a
    piece unacknowledged for ``send_timeout`` does not read: it is dropped.
    """

    def __init__(self, stream: Stream, session: SwarmSession, outbound: bool) -> None:
        self.stream = stream
        self.session = session
        self.outbound = outbound
        self.peer = stream.peer
        self.job: DownloadJob | None = None
        self.closed = False
        self.close_reason = ""
        self._outbox: deque[tuple[bytes, int]] = deque()  # (message, piece index or -1)
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.pieces_queued = 0  # reserved or queued piece uploads
        self.parked: list[_Upload] = []  # uploads waiting for room in the outbox
        self.unacked: dict[int, float] = {}  # pieces sent, not yet announced: index -> when
        self.last_ack = time.monotonic()  # (or when the connection began)
        self.max_unacked = max(OUTBOX_PIECES, UNACKED_BYTES // session.piece_size)

    def upload_room(self) -> bool:
        """Whether another piece may be queued for this peer now."""
        return self.pieces_queued < OUTBOX_PIECES and \
            self.pieces_queued + len(self.unacked) < self.max_unacked

    def acked(self, index: int) -> bool:
        """The peer announced (or withdrew) ``index``; True if that freed upload room."""
        if self.unacked.pop(index, None) is None:
            return False
        self.last_ack = time.monotonic()
        return True

    def push(self, message: bytes, piece: int = -1) -> None:
        """Queue a message; never waits.  A peer that lets the queue overflow is dropped."""
        if self.closed:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self.close(f"{NOT_READING}: send queue full")
            return
        self._outbox.append((message, piece))
        self._drained.clear()
        self._ready.set()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until everything queued was handed to the stream."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._drained.wait()

    async def run_writer(self, send_timeout: float,
                         on_piece_sent: Callable[[_Conn, int, int], None]) -> None:
        """Send the outbox in order until the connection closes."""
        while not self.closed:
            if not self._outbox:
                self._drained.set()
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(send_timeout / 4):
                        await self._ready.wait()
                if self.unacked and \
                        time.monotonic() - min(self.unacked.values()) > send_timeout:
                    self.close(f"{NOT_READING}: no piece acknowledged for {send_timeout:g}s")
                    return
                continue
            message, piece = self._outbox.popleft()
            try:
                async with asyncio.timeout(send_timeout):
                    await self.stream.send(message)
            except TimeoutError:
                self.close(f"{NOT_READING}: nothing read for {send_timeout:g}s")
                return
            except TransportError as exc:
                self.close(str(exc))
                return
            if piece >= 0:
                on_piece_sent(self, piece, len(message))
        self._drained.set()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._outbox.clear()
            self._ready.set()
            self._drained.set()
            self.stream.reset(reason)


@dataclass(order=True)
class _Upload:
    sort_key: tuple[int, int, int]  # (-priority, times this piece was sent, arrival)
    conn: _Conn = field(compare=False)
    blob_id: BlobId = field(compare=False)
    index: int = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class PriorityGate:
    """Lets download work of a priority proceed only while no higher priority is active."""

    def __init__(self) -> None:
        self._active: dict[object, Priority] = {}
        self._changed = asyncio.Condition()

    async def enter(self, owner: object, priority: Priority) -> None:
        async with self._changed:
            self._active[owner] = priority
            self._changed.notify_all()

    async def leave(self, owner: object) -> None:
        async with self._changed:
            self._active.pop(owner, None)
            self._changed.notify_all()

    def blocked(self, priority: Priority) -> bool:
        return any(p > priority for p in self._active.values())

    async def wait_turn(self, priority: Priority) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not self.blocked(priority))


class SwarmEngine:
    """Serves and downloads blobs over the swarm protocol for one node."""

    def __init__(self, store: Store, network: Network, config: SwarmConfig | None = None, *,
                 authorize: Callable[[NodeId], bool] | None = None,
                 piece_index: PieceIndex | None = None) -> None:
        self.store = store
        self.piece_index = piece_index
        self.network = network
        self.config = config or SwarmConfig()
        self._authorize = authorize
        self.gate = PriorityGate()
        self._jobs: dict[BlobId, DownloadJob] = {}
        self._layers: dict[BlobId, PieceLayer] = {}
        self._readers: dict[BlobId, PieceReader] = {}  # one open data file per served blob
        self._readers_lock = threading.Lock()
        self._priorities: dict[BlobId, Priority] = {}
        self._uploads: list[_Upload] = []
        self._upload_ready = asyncio.Event()
        self._seq = itertools.count()
        self._up_bucket = TokenBucket(self.config.upload_rate)
        self.down_bucket = TokenBucket(self.config.download_rate)
        self._tasks = TaskOwner("swarm")
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
        self.bytes_reused = 0  # piece bytes copied from other local blobs, not fetched
        self.pieces_rejected = 0
        self.connections_refused = 0
        self.requests_expired = 0  # requests re-issued elsewhere after their deadline
        self.protocol_errors = 0  # connections ended because a peer broke the protocol
        self.banned: dict[BlobId, set[NodeId]] = {}
        self.ban_reasons: dict[BlobId, dict[NodeId, str]] = {}
        self.bans: collections.Counter[BanKind] = collections.Counter()
        self.corrupt: dict[BlobId, str] = {}  # local copies found corrupt (and quarantined)
        self._serving: dict[BlobId, set[_Conn]] = {}
        self._sent_count: dict[BlobId, dict[int, int]] = {}
        self._redirected: dict[BlobId, dict[tuple[NodeId, int], int]] = {}
        # seed side: the connection each piece was first queued for
        self._claimed: dict[BlobId, dict[int, _Conn]] = {}
        network.set_handler(PROTOCOL, self._on_stream)

    async def start(self) -> None:
        for i in range(self.config.upload_workers):
            self._tasks.spawn_restarting(self._upload_worker, name=f"upload-{i}")

    async def aclose(self) -> None:
        await self._tasks.aclose()
        with self._readers_lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._tasks.spawn(coro, name=name)
        return task

    def set_priority(self, blob_id: BlobId, priority: Priority) -> None:
        """Serve requests for ``blob_id`` at ``priority`` (e.g. as a distribution's source)."""
        self._priorities[blob_id] = priority

    def ban(self, blob_id: BlobId, peer: NodeId, kind: BanKind, why: str) -> None:
        """Refuse ``peer`` for ``blob_id`` from now on."""
        if peer in self.banned.get(blob_id, ()):
            return
        self.banned.setdefault(blob_id, set()).add(peer)
        self.ban_reasons.setdefault(blob_id, {})[peer] = why
        self.bans[kind] += 1
        log.warning("swarm %s: banning %s: %s", blob_id.short(), peer.short(), why)
        for conn in list(self._serving.get(blob_id, ())):
            if conn.peer == peer:
                conn.close(f"banned: {why}")

    def is_banned(self, blob_id: BlobId, peer: NodeId) -> bool:
        return peer in self.banned.get(blob_id, ())

    # --- serving ---------------------------------------------------------------------------

    def layer_for(self, blob_id: BlobId) -> PieceLayer | None:
        layer = self._layers.get(blob_id)
        if layer is None:
            try:
                layer = self.store.piece_layer(blob_id)
            except BlobNotFoundError:
                return None
            self._layers[blob_id] = layer
        return layer

    async def _on_stream(self, stream: Stream) -> None:
        """An incoming swarm stream: the dialer's hello names the blob."""
        if self._authorize is not None and not self._authorize(stream.peer):
            self.connections_refused += 1
            stream.reset("not a member of this space")
            return
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await stream.recv()
            msg = peek_hello(first)
            blob_id = BlobId(msg.blob)
        except (TransportError, ProtocolError, BlobmeshError, TimeoutError) as exc:
            stream.reset(f"bad hello: {exc or 'timeout'}")
            return
        if self.is_banned(blob_id, stream.peer):
            self.connections_refused += 1
            stream.reset("banned: " + self.ban_reasons.get(blob_id, {}).get(stream.peer, ""))
            return
        job = self._jobs.get(blob_id)
        layer = self.layer_for(blob_id)
        size, piece_size = (layer.size, layer.piece_size) if layer else (msg.size, msg.piece_size)
        if job is None and layer is None:
            stream.reset("blob not here")
            return
        if self.connections >= self.config.max_connections:
            self.connections_refused += 1
            stream.reset("too many swarm connections")
            return
        try:
            session = SwarmSession(blob_id, size, piece_size)
        except ProtocolError as exc:
            stream.reset(str(exc))
            return
        conn = _Conn(stream, session, outbound=False)
        self._serving.setdefault(blob_id, set()).add(conn)  # counts before any await
        try:
            event = session.receive(first)
            have = job.have_bitfield() if job else self.store.bitfield(blob_id)
            async with asyncio.timeout(HELLO_TIMEOUT):
                await stream.send(session.hello(have, layer is not None,
                                                int(self._prio(blob_id))))
        except (ProtocolError, TransportError, StoreError, TimeoutError) as exc:
            stream.reset(str(exc) or "hello timed out")
            self._serving.get(blob_id, set()).discard(conn)
            return
        assert isinstance(event, PeerHello)
        await self._serve(conn, blob_id, event)

    def _prio(self, blob_id: BlobId) -> Priority:
        job = self._jobs.get(blob_id)
        return job.priority if job else self._priorities.get(blob_id, Priority.NORMAL)

    async def _serve(self, conn: _Conn, blob_id: BlobId, hello: PeerHello) -> None:
        """Run a connection until it ends: its writer, and its reader dispatching events to
        uploads and the download job.

        A connection outlives the download job that opened it: once we hold the blob we keep
        serving the peer until it holds it too.
        """
        pending: dict[int, _Upload] = {}
        self._serving.setdefault(blob_id, set()).add(conn)
        writer = self._spawn(conn.run_writer(self.config.send_timeout, self._piece_sent),
                             name=f"send-{conn.peer.short()}")
        job = self._jobs.get(blob_id)
        if job is not None:
            job.attach(conn, hello)
        try:
            while not conn.closed:
                raw = await conn.stream.recv()
                event = conn.session.receive(raw)
                job = conn.job
                if isinstance(event, PeerHas) and conn.acked(event.index):
                    self._unpark(conn)  # and on to the job, below
                if isinstance(event, PieceWanted):
                    if self._redirect_now(conn, blob_id, event.index):
                        conn.push(conn.session.reject(event.index, REJECT_ELSEWHERE))
                        continue
                    sent = self._sent_count.get(blob_id, {}).get(event.index, 0)
                    up = _Upload((-int(self._prio(blob_id)), sent, next(self._seq)), conn,
                                 blob_id, event.index)
                    pending[event.index] = up
                    heapq.heappush(self._uploads, up)
                    self._upload_ready.set()
                elif isinstance(event, WantCancelled):
                    if event.index in pending:
                        pending.pop(event.index).cancelled = True
                    if conn.acked(event.index):
                        self._unpark(conn)
                elif isinstance(event, LayerWanted):
                    layer = self.layer_for(blob_id)
                    if layer is not None:
                        conn.push(conn.session.layer(layer.to_bytes()))
                elif isinstance(event, PeerLeft):
                    return
                elif job is not None:
                    if event is not None:
                        await job.on_event(conn, event)
                elif conn.session.peer_complete and self.store.has(blob_id):
                    conn.push(conn.session.bye("both complete"))
                    await conn.drain(1.0)
                    return
        except (TransportError, ProtocolError) as exc:
            if isinstance(exc, ProtocolError):
                self.protocol_errors += 1
                log.info("swarm %s: %s broke the protocol: %s", blob_id.short(),
                         conn.peer.short(), exc)
            else:
                log.debug("swarm %s: connection to %s ended: %s", blob_id.short(),
                          conn.peer.short(), exc)
            conn.close(str(exc))
        finally:
            if conn.close_reason.startswith(NOT_READING):
                self.ban(blob_id, conn.peer, BanKind.NOT_READING, conn.close_reason)
            serving = self._serving.get(blob_id, set())
            serving.discard(conn)
            if not serving:
                self._forget_blob(blob_id)
            for up in pending.values():
                up.cancelled = True
            if conn.job is not None:
                conn.job.detach(conn, conn.close_reason or "stream ended")
            conn.close("stream ended")
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _forget_blob(self, blob_id: BlobId) -> None:
        """Drop the per-piece seed state of a blob nobody is connected about any more."""
        self._serving.pop(blob_id, None)
        self._claimed.pop(blob_id, None)
        self._sent_count.pop(blob_id, None)
        self._redirected.pop(blob_id, None)
        if blob_id not in self._jobs:
            self._layers.pop(blob_id, None)
        self._close_reader(blob_id)

    def _close_reader(self, blob_id: BlobId) -> None:
        with self._readers_lock:
            reader = self._readers.pop(blob_id, None)
        if reader is not None:
            reader.close()  # waits for a read in flight; later ones are refused

    def downloading(self) -> list[BlobId]:
        """Blobs with a download job running."""
        return list(self._jobs)

    @property
    def connections(self) -> int:
        """Open swarm connections, over all blobs."""
        return sum(len(conns) for conns in self._serving.values())

    def _redirect(self, conn: _Conn, blob_id: BlobId, index: int) -> bool:
        """Whether a seed should send the requester to other holders of this piece.

        A seed's upload is the scarcest resource of a swarm (the lower bound is F/u_s when
        the targets can relay), so a seed that already sent a piece once points a requester
        at the peers that hold it — a few times per requester and piece, so nobody starves.
        """
        if conn.job is not None or self._sent_count.get(blob_id, {}).get(index, 0) == 0:
            return False
        counts = self._redirected.setdefault(blob_id, {})
        key = (conn.peer, index)
        if counts.get(key, 0) >= MAX_REDIRECTS:
            return False
        # a peer we sent it to and that has not announced it yet holds it all but
        holders = any(index in other.session.peer_have or index in other.unacked
                      for other in self._serving.get(blob_id, ()) if other is not conn)
        if holders:
            counts[key] = counts.get(key, 0) + 1
        return holders

    def _redirect_now(self, conn: _Conn, blob_id: BlobId, index: int) -> bool:
        """A seed refuses at once a piece it already gives another peer.

        The first requester of a piece claims it; while that claim is live, other
        requesters are told to get it elsewhere (the claimant will announce it), at most
        ``MAX_REDIRECTS`` times per requester and piece so nobody starves.  A claimant that
        has acknowledged nothing for ``CLAIM_TTL`` (a peer that does not read, say, having
        asked for every piece) holds no claim.
        """
        if conn.job is not None:
            return False
        claims = self._claimed.setdefault(blob_id, {})
        owner = claims.get(index)
        if owner is None or owner.closed or owner is conn or \
                time.monotonic() - owner.last_ack > CLAIM_TTL:
            claims[index] = conn
            return False
        counts = self._redirected.setdefault(blob_id, {})
        key = (conn.peer, index)
        n = counts.get(key, 0)
        if n >= MAX_REDIRECTS:
            return False
        counts[key] = n + 1
        return True

    async def _upload_worker(self) -> None:
        """Pick the most urgent upload, read and verify it, queue it on its connection.

        Never waits on a peer: an upload whose connection already has ``OUTBOX_PIECES``
        queued is parked on that connection until its writer catches up.
        """
        while True:
            while not self._uploads:
                self._upload_ready.clear()
                await self._upload_ready.wait()
            up = heapq.heappop(self._uploads)
            conn = up.conn
            if up.cancelled or conn.closed:
                claims = self._claimed.get(up.blob_id, {})
                if claims.get(up.index) is conn and \
                        not self._sent_count.get(up.blob_id, {}).get(up.index):
                    del claims[up.index]  # never sent: let the next requester have it
                continue
            sent = self._sent_count.get(up.blob_id, {}).get(up.index, 0)
            if sent > up.sort_key[1]:
                # sent to someone else since it was queued: let never-sent pieces go first
                up.sort_key = (up.sort_key[0], sent, up.sort_key[2])
                heapq.heappush(self._uploads, up)
                continue
            if self._redirect(conn, up.blob_id, up.index):
                conn.push(conn.session.reject(up.index, REJECT_ELSEWHERE))
                continue
            if not conn.upload_room():
                conn.parked.append(up)
                continue
            conn.pieces_queued += 1  # reserved across the awaits below
            try:
                data = await asyncio.to_thread(self._read_piece, up.blob_id, up.index)
            except (StoreError, CorruptBlobError, OSError) as exc:
                # OSError: the file was closed under the read (the blob was dropped or its
                # download finished): the peer asks again elsewhere or here
                conn.pieces_queued -= 1
                conn.push(conn.session.reject(up.index, str(exc)))
                if isinstance(exc, CorruptBlobError):
                    await self._on_corrupt(up.blob_id, exc)
                continue
            await self._up_bucket.take(len(data))
            conn.push(conn.session.piece(up.index, data), up.index)

    def _piece_sent(self, conn: _Conn, index: int, nbytes: int) -> None:
        """A connection's writer handed a piece to the transport: account, unpark."""
        blob_id = conn.session.blob_id
        conn.pieces_queued -= 1
        if index not in conn.session.peer_have:
            conn.unacked[index] = time.monotonic()
        self.bytes_uploaded += nbytes
        counts = self._sent_count.setdefault(blob_id, {})
        counts[index] = counts.get(index, 0) + 1
        self._unpark(conn)

    def _unpark(self, conn: _Conn) -> None:
        if conn.parked:
            for up in conn.parked:
                heapq.heappush(self._uploads, up)
            conn.parked.clear()
            self._upload_ready.set()

    def _read_piece(self, blob_id: BlobId, index: int) -> bytes:
        """Read a piece to upload (in a worker thread), verified: never pass on data that
        rotted on our disk."""
        layer = self.layer_for(blob_id)
        if layer is None:
            raise BlobNotFoundError(f"blob {blob_id} is not here", blob_id=blob_id)
        job = self._jobs.get(blob_id)
        partial = job.partial if job is not None else None
        if partial is None:
            with self._readers_lock:
                reader = self._readers.get(blob_id)
                if reader is None:
                    reader = self._readers[blob_id] = PieceReader(self.store, layer, verify=True)
            return reader.read(index)
        # written but maybe not yet flushed, so not visible to a store reader
        data = partial.read_piece(index)
        if not layer.check_piece(index, data):
            raise CorruptBlobError(f"piece {index} of {blob_id.short()} is corrupt here",
                                   blob_id=blob_id, piece=index)
        return data

    async def _on_corrupt(self, blob_id: BlobId, exc: CorruptBlobError) -> None:
        """Our complete copy rotted: report it once and quarantine it (nobody is sent it)."""
        if blob_id in self.corrupt or blob_id in self._jobs:
            return  # a partial copy is repaired by its own download job
        self.corrupt[blob_id] = str(exc)
        log.error("swarm %s: the local copy is corrupt (%s); quarantining it", blob_id.short(),
                  exc)
        self._close_reader(blob_id)
        self._layers.pop(blob_id, None)
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.store.quarantine, blob_id)

    # --- downloading -----------------------------------------------------------------------

    async def download(self, blob_id: BlobId, size: int, piece_size: int, peers: PeerSource,
                       priority: Priority = Priority.NORMAL,
                       progress: ProgressCallback | None = None, pin: str | None = None
                       ) -> None:
        """Download ``blob_id`` from the peers ``peers()`` names, until complete.

        With ``pin``, the blob is pinned under that name as soon as its first byte is stored,
        so neither the partial nor the finished blob can be collected.  Raises
        :class:`TransferError` (with the reason) when the download stalls; stays cancellable
        at every await.  Concurrent calls for one blob share one job.
        """
        if pin is not None and self.store.has(blob_id):
            await asyncio.to_thread(self.store.pin, blob_id, pin)
        job = self._jobs.get(blob_id)
        if job is not None:
            await job.done.wait()
            if job.error is not None:
                raise job.error
            return
        job = DownloadJob(self, blob_id, size, piece_size, peers, priority, progress, pin)
        self._jobs[blob_id] = job
        try:
            await job.run()
        finally:
            self._jobs.pop(blob_id, None)
            self._layers.pop(blob_id, None)


class DownloadJob:
    """Downloads one blob from several peers at once.

    Requests belong to connections: the picker and the request ledger are keyed by
    :class:`_Conn`, so when a connection closes (say, the loser of a duplicate-connection
    tie-break) exactly its requests, the piece layer's included, are asked again at once.
    """

    def __init__(self, engine: SwarmEngine, blob_id: BlobId, size: int, piece_size: int,
                 peers: PeerSource, priority: Priority, progress: ProgressCallback | None,
                 pin: str | None = None) -> None:
        self.engine = engine
        self.blob_id = blob_id
        self.size = size
        self.piece_size = piece_size
        self.priority = priority
        cfg = engine.config
        self._progress = progress
        self._conns: dict[NodeId, _Conn] = {}  # the one connection kept per peer
        self._hellos: dict[_Conn, PeerHello] = {}
        self._dialing: set[NodeId] = set()
        self._last_dial: dict[NodeId, float] = {}
        # every target is given the same list: each dials its own sample (see DialPlan)
        self._dial_plan = DialPlan[NodeId](lambda: list(peers()), cfg.peer_retry,
                                           4 * cfg.max_peers_per_blob, SOURCE_FANOUT,
                                           random.Random())
        self._partial: PartialBlob | None = None
        self._layer: PieceLayer | None = None
        self._picker: PiecePicker[_Conn] | None = None
        self._ledger = RequestLedger[_Conn](cfg.request_timeout, cfg.request_strikes)
        self._wake = asyncio.Event()
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.bytes_done = 0
        self._rate_mark = (time.monotonic(), 0)
        self.rate = 0.0
        self._last_progress = time.monotonic()
        self._last_flush = time.monotonic()
        self._lease = LeaseId.new(f"swarm:{blob_id.short()}")
        self._pin = pin
        self._pending_layer: PieceLayer | None = None
        self._layer_conns: set[_Conn] = set()  # the connections asked for the piece layer
        self._layer_expired: set[_Conn] = set()  # ... and those that let it expire
        self._disk_full = False
        self.state = TargetState.TRANSFERRING
        self.reason = ""
        self._ban_note = ""
        self.last_ban: BadPeerDataError | None = None

    # --- state visible to the engine -------------------------------------------------------

    @property
    def partial(self) -> PartialBlob | None:
        return self._partial

    @property
    def banned(self) -> set[NodeId]:
        return self.engine.banned.get(self.blob_id, set())

    def have_bitfield(self) -> Bitfield:
        if self._picker is not None:
            return self._picker.have.copy()
        npieces = max(1, -(-self.size // self.piece_size))
        return Bitfield(npieces)

    def attach(self, conn: _Conn, hello: PeerHello) -> None:
        if conn.peer in self.banned:
            conn.close("banned")
            return
        old = self._conns.get(conn.peer)
        if old is not None and old is not conn:
            # Both sides dialed each other.  Both must keep the same one of the two
            # connections: the one dialed by the smaller node id.
            me = self.engine.network.node_id
            keep_new = conn.outbound == (me < conn.peer)
            loser = old if keep_new else conn
            loser.close("duplicate connection")
            if not keep_new:
                return
            self._forget(old)
        self._conns[conn.peer] = conn
        conn.job = self
        self._hellos[conn] = hello
        if self._picker is not None:
            self._picker.add_peer(conn, conn.session.peer_have)
        self._wake.set()

    def detach(self, conn: _Conn, reason: str) -> None:
        if self._conns.get(conn.peer) is conn:
            self._forget(conn)
            log.debug("swarm %s: lost %s: %s", self.blob_id.short(), conn.peer.short(), reason)
        self._wake.set()

    def _forget(self, conn: _Conn) -> None:
        """Drop a connection; whatever it owed us (pieces, the layer) is asked elsewhere."""
        conn.job = None
        if self._conns.get(conn.peer) is conn:
            del self._conns[conn.peer]
        self._hellos.pop(conn, None)
        self._layer_expired.discard(conn)
        self._ledger.dropped(conn)
        if self._picker is not None:
            self._picker.remove_peer(conn)
        self._layer_conns.discard(conn)
        self._wake.set()

    async def on_event(self, conn: _Conn, event: Event) -> None:
        if self._conns.get(conn.peer) is not conn:
            return
        if isinstance(event, LayerArrived):
            self._on_layer(conn, event.raw)
        elif isinstance(event, PeerHas):
            if self._picker is not None:
                self._picker.peer_has(conn, event.index)
            self._wake.set()
        elif isinstance(event, PieceRefused):
            self._ledger.answered(conn, event.index, time.monotonic())
            if self._picker is not None:
                self._picker.failed(conn, event.index)
                if event.reason == REJECT_ELSEWHERE:
                    self._picker.defer(conn, event.index)
            self._wake.set()
        elif isinstance(event, PieceArrived):
            await self._on_piece(conn, event.index, event.data)

    # --- the job ---------------------------------------------------------------------------

    async def run(self) -> None:
        store = self.engine.store
        try:
            await self.engine.gate.enter(self, self.priority)
            if store.has(self.blob_id):
                await self._check_local_copy()
            if store.has(self.blob_id):
                return
            try:
                layer = await asyncio.to_thread(store.piece_layer, self.blob_id)
            except BlobNotFoundError:
                layer = None
            if layer is not None:
                self._pending_layer = layer
            await self._loop()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            await self._shutdown()
            await self.engine.gate.leave(self)
            self.done.set()

    async def _check_local_copy(self) -> None:
        """A copy that is already here counts only once it verifies; a rotten one goes."""
        store = self.engine.store

        def verify() -> None:
            with store.get_reader(self.blob_id, self._lease, verify=True) as reader:
                while reader.read(4 << 20):
                    pass

        try:
            await asyncio.to_thread(verify)
        except CorruptBlobError as exc:
            log.error("swarm %s: the local copy is corrupt (%s); quarantined, downloading it "
                      "again", self.blob_id.short(), exc)
            self.engine.corrupt[self.blob_id] = str(exc)
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(store.quarantine, self.blob_id)
            if self._pin is not None:
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(store.unpin, self._pin)

    async def _start_with_layer(self, layer: PieceLayer) -> None:
        store = self.engine.store
        partial = await asyncio.to_thread(store.begin_partial, layer, self._lease)
        self._layer, self._partial = layer, partial
        for conn in self._layer_conns:  # the other answers are no longer owed
            self._ledger.withdrawn(conn, LAYER)
        self._layer_conns.clear()
        if self.engine.piece_index is not None:
            # pieces identical to pieces of blobs already here are copied, not fetched
            reused = await asyncio.to_thread(fill_from_index, self.engine.piece_index, partial)
            self.engine.bytes_reused += reused.bytes
        if self._pin is not None:
            await asyncio.to_thread(store.pin, self.blob_id, self._pin)
        have = partial.have
        self._picker = PiecePicker[_Conn](have)
        self.bytes_done = sum(layer.piece_range(i)[1] for i in have)
        for conn in self._conns.values():
            self._picker.add_peer(conn, conn.session.peer_have)
        self._report()

    def _on_layer(self, conn: _Conn, raw: bytes) -> None:
        self._ledger.answered(conn, LAYER, time.monotonic())
        self._layer_conns.discard(conn)
        if self._layer is not None or self._pending_layer is not None:
            return
        try:
            layer = PieceLayer.from_bytes(self.blob_id, self.size, self.piece_size, raw)
        except VerificationError:
            self._ban(conn, "sent a piece layer that does not match the blob id")
            return
        self._pending_layer = layer
        self._wake.set()

    async def _loop(self) -> None:
        cfg = self.engine.config
        while True:
            now = time.monotonic()
            try:
                if self._pending_layer is not None and self._layer is None:
                    await self._start_with_layer(self._pending_layer)
                if self._picker is not None and self._picker.complete:
                    await self._finish()
                    return
                if self._partial is not None and now - self._last_flush > cfg.flush_interval:
                    # bound what a crash can lose to about one interval of verified pieces
                    self._last_flush = now
                    await asyncio.to_thread(self._partial.flush)
            except StoreFullError:
                self._enter_disk_full()
            self._dial_more()
            self._expire_requests(now)
            if self._disk_full:
                await self._wait_for_disk()
            elif self._layer is None:
                self._ask_layer()
            else:
                if self.engine.gate.blocked(self.priority):
                    self._set_state(TargetState.QUEUED,
                                    "waiting for a higher-priority distribution")
                    await self.engine.gate.wait_turn(self.priority)
                    self._last_progress = time.monotonic()  # queued time is no stall
                    self._set_state(TargetState.TRANSFERRING)
                self._fill_pipelines()
            idle = time.monotonic() - self._last_progress
            if idle > cfg.stall_timeout:
                raise TransferError(
                    f"no progress on {self.blob_id.short()} for {cfg.stall_timeout:.0f}s "
                    f"from {len(self._conns)} peer(s)", blob_id=self.blob_id)
            if idle > min(5.0, cfg.stall_timeout / 2) and \
                    self.state is TargetState.TRANSFERRING:
                self._set_state(TargetState.STALLED,
                                f"no progress for {idle:.0f}s from {len(self._conns)} peer(s)")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel)
                async with asyncio.timeout(0.25):
                    await self._wake.wait()

    def _set_state(self, state: TargetState, reason: str = "") -> None:
        if state is TargetState.TRANSFERRING and not reason:
            reason = self._ban_note  # moving, though some peer had to be banned
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason = state, reason
            self._report(force=True)

    def _enter_disk_full(self) -> None:
        if self._disk_full:
            return
        self._disk_full = True
        kept = self._picker.have.count() if self._picker is not None else 0
        log.warning("swarm %s: disk full; keeping %d verified piece(s), waiting for space",
                    self.blob_id.short(), kept)
        for conn in self._conns.values():  # what is still in flight could not be stored
            for index in conn.session.outstanding:
                self._withdraw(conn, index)
        self._set_state(TargetState.WAITING_DISK, "disk full")

    async def _wait_for_disk(self) -> None:
        """Until the store's filesystem has room for a few pieces again.

        Meanwhile the pieces written so far are made durable (a restart keeps them).
        """
        home = self.engine.store.home
        flushed = False
        while True:
            if not flushed and self._partial is not None:
                with contextlib.suppress(StoreError, OSError):  # no room for the metadata yet
                    await asyncio.to_thread(self._partial.flush)
                    flushed = True
            free = (await asyncio.to_thread(shutil.disk_usage, home)).free
            if free >= 4 * self.piece_size + DISK_HEADROOM:
                break
            await asyncio.sleep(self.engine.config.disk_retry)
        log.info("swarm %s: disk space is back; resuming", self.blob_id.short())
        self._disk_full = False
        self._last_progress = time.monotonic()  # waiting for disk is no stall
        self._set_state(TargetState.TRANSFERRING)

    def _withdraw(self, conn: _Conn, index: int) -> None:
        """Cancel our request (a piece already on its way is then taken or dropped)."""
        conn.push(conn.session.cancel(index))
        self._ledger.withdrawn(conn, index)
        if self._picker is not None:
            self._picker.failed(conn, index)

    def _expire_requests(self, now: float) -> None:
        """Requests a connection did not answer in time are asked elsewhere."""
        timeout = self.engine.config.request_timeout
        for exp in self._ledger.handle_timer(now):
            self.engine.requests_expired += len(exp.indices)
            for index in exp.indices:
                if index == LAYER:
                    self._layer_expired.add(exp.conn)
                    self._layer_conns.discard(exp.conn)
                    continue
                exp.conn.push(exp.conn.session.cancel(index))
                if self._picker is not None:
                    self._picker.failed(exp.conn, index)
            if exp.ban:
                self._ban(exp.conn, f"answered none of its requests for {timeout:g}s, "
                                    f"{exp.strikes} times in a row", BanKind.UNRESPONSIVE)
            else:
                log.debug("swarm %s: %s missed a deadline (%d request(s) re-issued)",
                          self.blob_id.short(), exp.conn.peer.short(), len(exp.indices))
            self._wake.set()

    def _ask_layer(self) -> None:
        """Ask up to ``LAYER_ASKS`` peers at once (it is small; the first valid one wins), so
        one that never answers costs no deadline."""
        # a connection that let a layer request expire is asked again only if nobody else can
        candidates = [c for c, hello in self._hellos.items() if hello.has_layer and
                      not c.closed and c not in self._layer_conns]
        candidates.sort(key=lambda c: c in self._layer_expired)
        for conn in candidates[:LAYER_ASKS - len(self._layer_conns)]:
            self._layer_conns.add(conn)
            conn.push(conn.session.request_layer())
            self._ledger.sent(conn, LAYER, time.monotonic())

    def _fill_pipelines(self) -> None:
        picker = self._picker
        assert picker is not None
        now = time.monotonic()
        pipeline = self.engine.config.pipeline
        # downloading peers first: what they can give need not cost a seed's upload
        conns = sorted(self._conns.values(), key=lambda c: c.session.peer_complete)
        for conn in conns:
            if conn.closed:
                continue
            for index in picker.pick(conn, self._ledger.room(conn, pipeline)):
                conn.push(conn.session.request(index))
                self._ledger.sent(conn, index, now)

    async def _on_piece(self, conn: _Conn, index: int, data: bytes) -> None:
        picker, partial = self._picker, self._partial
        self._ledger.answered(conn, index, time.monotonic())
        if picker is None or partial is None or index in picker.have or self._disk_full:
            return  # a late copy nobody needs any more, or one we cannot store now
        await self.engine.down_bucket.take(len(data))
        try:
            wrote = await asyncio.to_thread(self._write_piece, partial, index, data)
        except VerificationError:
            self.engine.pieces_rejected += 1
            self._ban(conn, f"sent a corrupt piece {index}")
            return
        except StoreFullError:  # (an OSError too: first)
            picker.failed(conn, index)
            self._enter_disk_full()
            self._wake.set()
            return
        except OSError:
            if self._partial is not partial:
                return  # the download ended (cancelled, say) under this write
            raise
        duplicates = picker.received(conn, index)
        if wrote:
            self.bytes_done += len(data)
            self.engine.bytes_downloaded += len(data)
            self._last_progress = time.monotonic()
            if self.state is TargetState.STALLED:
                self._set_state(TargetState.TRANSFERRING)
        for other in duplicates:
            if not other.closed:
                other.push(other.session.cancel(index))
                self._ledger.withdrawn(other, index)
        for other in self._conns.values():
            other.push(other.session.have(index))
        self._report()
        self._wake.set()

    def _write_piece(self, partial: PartialBlob, index: int, data: bytes) -> bool:
        """Write a piece (in a worker thread), leaving room for the store's metadata: a
        disk filled to the last byte could not even record the pieces already written."""
        if shutil.disk_usage(self.engine.store.home).free < len(data) + DISK_HEADROOM:
            raise StoreFullError(f"disk full writing {self.blob_id.short()}",
                                 blob_id=self.blob_id)
        return partial.write_piece(index, data)

    def _ban(self, conn: _Conn, why: str, kind: BanKind = BanKind.BAD_DATA) -> None:
        if kind is BanKind.BAD_DATA:
            self.last_ban = BadPeerDataError(f"peer {conn.peer} {why}", peer=conn.peer,
                                             blob_id=self.blob_id)
        self._forget(conn)
        if self._picker is not None:
            self._picker.ban(conn)
        self.engine.ban(self.blob_id, conn.peer, kind, why)
        conn.close(why)
        n = len(self.banned)
        self._ban_note = f"banned {n} peer(s), last {conn.peer.short()}: {why}"
        if self.state is TargetState.TRANSFERRING:
            self._set_state(TargetState.TRANSFERRING)

    def _dial_more(self) -> None:
        cfg = self.engine.config
        want = min(cfg.max_peers_per_blob - len(self._conns),
                   cfg.max_connections - self.engine.connections) - len(self._dialing)
        if want <= 0:
            return
        now = time.monotonic()
        me = self.engine.network.node_id
        banned = self.banned
        for peer in self._dial_plan.order(now):
            if want <= 0:
                break
            if peer == me or peer in self._conns or peer in self._dialing or \
                    peer in banned or \
                    now - self._last_dial.get(peer, -1e9) < cfg.peer_retry:
                continue
            self._last_dial[peer] = now
            self._dialing.add(peer)
            want -= 1
            self.engine._spawn(self._dial(peer), name=f"dial-{peer.short()}")

    async def _dial(self, peer: NodeId) -> None:
        conn: _Conn | None = None
        try:
            stream = await self.engine.network.open_stream(peer, PROTOCOL)
            session = SwarmSession(self.blob_id, self.size, self.piece_size)
            conn = _Conn(stream, session, outbound=True)
            async with asyncio.timeout(HELLO_TIMEOUT):
                await stream.send(session.hello(self.have_bitfield(), self._layer is not None,
                                                int(self.priority)))
                event = session.receive(await stream.recv())
        except (TransportError, ProtocolError, TimeoutError) as exc:
            log.debug("swarm %s: dial %s failed: %s", self.blob_id.short(), peer.short(),
                      exc or "timeout")
            if conn is not None:
                conn.close(str(exc) or "hello timed out")
            return
        finally:
            self._dialing.discard(peer)
            self._wake.set()
        if not isinstance(event, PeerHello):
            conn.close("expected hello")
            return
        await self.engine._serve(conn, self.blob_id, event)

    async def _finish(self) -> None:
        partial = self._partial
        assert partial is not None
        await asyncio.to_thread(partial.close)
        self._partial = None
        if not self.engine.store.has(self.blob_id):
            raise TransferError(f"{self.blob_id} incomplete after all pieces arrived",
                                blob_id=self.blob_id)
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        t0, b0 = self._rate_mark
        if now - t0 >= 0.5:
            self.rate = (self.bytes_done - b0) / (now - t0)
            self._rate_mark = (now, self.bytes_done)
        if self._progress is not None:
            picker = self._picker
            busy = sorted((c for c in self._conns.values() if self._ledger.outstanding(c)),
                          key=self._ledger.outstanding, reverse=True)
            self._progress(JobProgress(self.bytes_done, self.size,
                                       picker.have.count() if picker else 0,
                                       picker.have.size if picker else 0,
                                       len(self._conns), self.rate, self.state, self.reason,
                                       tuple(c.peer for c in busy[:SOURCES_REPORTED])))

    async def _shutdown(self) -> None:
        complete = self.engine.store.has(self.blob_id)
        for conn in list(self._conns.values()):
            self._forget(conn)
            if complete and not conn.session.peer_complete:
                continue  # keep seeding to a peer that still downloads
            conn.push(conn.session.bye("done"))
            await conn.drain(1.0)
            conn.close("done")
        partial, self._partial = self._partial, None  # pieces still arriving are dropped
        if partial is not None:
            with contextlib.suppress(OSError, StoreError):
                await asyncio.to_thread(partial.close)
        with contextlib.suppress(StoreError):
            self.engine.store.advise_lease_dropped(self._lease, self.blob_id)


__all__ = ["BanKind", "DownloadJob", "JobProgress", "PriorityGate", "SwarmConfig", "SwarmEngine"]
