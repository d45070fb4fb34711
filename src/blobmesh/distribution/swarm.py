"""The swarm engine: serves pieces to, and downloads pieces from, many peers at once.

One :class:`SwarmEngine` per node.  It answers every incoming ``blobmesh-swarm/1`` stream for
a blob it holds (complete or partial) and runs :class:`DownloadJob` s, each of which talks to
several peers, picks pieces rarest first with a pipeline per peer, verifies every piece before
it is stored, and bans a peer that sends bad data.  Uploads from all peers share one priority
queue, and downloads pass a priority gate, so higher-priority work gets bandwidth first.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field

from blobmesh.distribution.model import Priority
from blobmesh.distribution.peerwire import (
    PROTOCOL,
    REJECT_ELSEWHERE,
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
from blobmesh.errors import (
    BadPeerDataError,
    BlobmeshError,
    BlobNotFoundError,
    CorruptBlobError,
    ProtocolError,
    StoreError,
    TransferError,
    TransportError,
    VerificationError,
)
from blobmesh.hashing import BlobId, PieceLayer
from blobmesh.store import Bitfield, LeaseId, PartialBlob, PieceReader, Store
from blobmesh.store.piece_index import PieceIndex, fill_from_index
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3


@dataclass(slots=True)
class SwarmConfig:
    """Node-wide swarm limits (rates in bytes/s, 0 = unlimited)."""

    pipeline: int = 16  # requests in flight per peer
    max_peers_per_blob: int = 8
    upload_workers: int = 4
    upload_rate: float = 0.0
    download_rate: float = 0.0
    max_connections: int = 64  # swarm connections over all blobs, in and out
    peer_retry: float = 1.0  # seconds before dialing a peer that failed again
    stall_timeout: float = 30.0
    flush_interval: float = 1.0  # make received pieces durable (and resumable) this often


@dataclass(slots=True)
class JobProgress:
    """What a download job reports to its owner."""

    bytes_done: int
    bytes_total: int
    pieces_done: int
    pieces_total: int
    peers: int
    rate: float


PeerSource = Callable[[], Iterable[NodeId]]
ProgressCallback = Callable[[JobProgress], None]


class _Conn:
    """One stream with one peer about one blob."""

    def __init__(self, stream: Stream, session: SwarmSession, outbound: bool) -> None:
        self.stream = stream
        self.session = session
        self.outbound = outbound
        self.peer = stream.peer
        self.job: DownloadJob | None = None
        self._send_lock = asyncio.Lock()
        self.closed = False

    async def send(self, message: bytes) -> None:
        async with self._send_lock:
            await self.stream.send(message)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
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
        self._workers: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
        self.bytes_reused = 0  # piece bytes copied from other local blobs, not fetched
        self.pieces_rejected = 0
        self.connections_refused = 0
        self.banned: dict[BlobId, set[NodeId]] = {}
        self._serving: dict[BlobId, set[_Conn]] = {}
        self._sent_count: dict[BlobId, dict[int, int]] = {}
        self._redirected: dict[BlobId, dict[tuple[NodeId, int], int]] = {}
        # seed side: the connection each piece was first queued for
        self._claimed: dict[BlobId, dict[int, _Conn]] = {}
        network.set_handler(PROTOCOL, self._on_stream)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._upload_worker())
                         for _ in range(self.config.upload_workers)]

    async def aclose(self) -> None:
        tasks = [*self._workers, *self._conn_tasks]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._workers.clear()
        with self._readers_lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    def set_priority(self, blob_id: BlobId, priority: Priority) -> None:
        """Serve requests for ``blob_id`` at ``priority`` (e.g. as a distribution's source)."""
        self._priorities[blob_id] = priority

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
            first = await stream.recv()
            msg = peek_hello(first)
            blob_id = BlobId(msg.blob)
        except (TransportError, ProtocolError, BlobmeshError) as exc:
            stream.reset(f"bad hello: {exc}")
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
            await conn.send(session.hello(have, layer is not None, int(self._prio(blob_id))))
        except (ProtocolError, TransportError, StoreError) as exc:
            stream.reset(str(exc))
            self._serving.get(blob_id, set()).discard(conn)
            return
        assert isinstance(event, PeerHello)
        if job is not None:
            job.attach(conn, event)
        await self._serve(conn, blob_id)

    def _prio(self, blob_id: BlobId) -> Priority:
        job = self._jobs.get(blob_id)
        return job.priority if job else self._priorities.get(blob_id, Priority.NORMAL)

    async def _serve(self, conn: _Conn, blob_id: BlobId) -> None:
        """Read a connection until it ends, dispatching events to uploads and the job.

        A connection outlives the download job that opened it: once we hold the blob we keep
        serving the peer until it holds it too.
        """
        pending: dict[int, _Upload] = {}
        self._serving.setdefault(blob_id, set()).add(conn)
        try:
            while True:
                raw = await conn.stream.recv()
                event = conn.session.receive(raw)
                job = conn.job
                if isinstance(event, PieceWanted):
                    if self._redirect_now(conn, blob_id, event.index):
                        await conn.send(conn.session.reject(event.index,
                                                            REJECT_ELSEWHERE))
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
                elif isinstance(event, LayerWanted):
                    layer = self.layer_for(blob_id)
                    if layer is not None:
                        await conn.send(conn.session.layer(layer.to_bytes()))
                elif isinstance(event, PeerLeft):
                    return
                elif job is not None:
                    await job.on_event(conn, event)
                elif conn.session.peer_complete and self.store.has(blob_id):
                    await conn.send(conn.session.bye("both complete"))
                    return
        except (TransportError, ProtocolError) as exc:
            log.debug("swarm %s: connection to %s ended: %s", blob_id.short(), conn.peer.short(),
                      exc)
            conn.close(str(exc))
        finally:
            serving = self._serving.get(blob_id, set())
            serving.discard(conn)
            if not serving:
                self._forget_blob(blob_id)
            for up in pending.values():
                up.cancelled = True
            if conn.job is not None:
                conn.job.detach(conn, "stream ended")
            conn.close("stream ended")

    def _forget_blob(self, blob_id: BlobId) -> None:
        """Drop the per-piece seed state of a blob nobody is connected about any more."""
        self._serving.pop(blob_id, None)
        self._claimed.pop(blob_id, None)
        self._sent_count.pop(blob_id, None)
        self._redirected.pop(blob_id, None)
        if blob_id not in self._jobs:
            self._layers.pop(blob_id, None)
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
        holders = any(index in other.session.peer_have
                      for other in self._serving.get(blob_id, ()) if other is not conn)
        if holders:
            counts[key] = counts.get(key, 0) + 1
        return holders

    def _redirect_now(self, conn: _Conn, blob_id: BlobId, index: int) -> bool:
        """A seed refuses at once a piece it already gives another peer.

        The first requester of a piece claims it; while that claim is live, other
        requesters are told to get it elsewhere (the claimant will announce it), at most
        ``MAX_REDIRECTS`` times per requester and piece so nobody starves.
        """
        if conn.job is not None:
            return False
        claims = self._claimed.setdefault(blob_id, {})
        owner = claims.get(index)
        if owner is None or owner.closed or owner is conn:
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
        while True:
            while not self._uploads:
                self._upload_ready.clear()
                await self._upload_ready.wait()
            up = heapq.heappop(self._uploads)
            if up.cancelled or up.conn.closed:
                claims = self._claimed.get(up.blob_id, {})
                if claims.get(up.index) is up.conn and \
                        not self._sent_count.get(up.blob_id, {}).get(up.index):
                    del claims[up.index]  # never sent: let the next requester have it
                continue
            sent = self._sent_count.get(up.blob_id, {}).get(up.index, 0)
            if sent > up.sort_key[1]:
                # sent to someone else since it was queued: let never-sent pieces go first
                up.sort_key = (up.sort_key[0], sent, up.sort_key[2])
                heapq.heappush(self._uploads, up)
                continue
            if self._redirect(up.conn, up.blob_id, up.index):
                with contextlib.suppress(TransportError):
                    await up.conn.send(up.conn.session.reject(up.index, REJECT_ELSEWHERE))
                continue
            try:
                data = await asyncio.to_thread(self._read_piece, up.blob_id, up.index)
            except (StoreError, CorruptBlobError) as exc:
                with contextlib.suppress(TransportError):
                    await up.conn.send(up.conn.session.reject(up.index, str(exc)))
                continue
            await self._up_bucket.take(len(data))
            try:
                await up.conn.send(up.conn.session.piece(up.index, data))
            except TransportError:
                up.conn.closed = True
                continue
            self.bytes_uploaded += len(data)
            counts = self._sent_count.setdefault(up.blob_id, {})
            counts[up.index] = counts.get(up.index, 0) + 1

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
            self.store.pin(blob_id, pin)
        if self.store.has(blob_id):
            return
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
    """Downloads one blob from several peers at once."""

    def __init__(self, engine: SwarmEngine, blob_id: BlobId, size: int, piece_size: int,
                 peers: PeerSource, priority: Priority, progress: ProgressCallback | None,
                 pin: str | None = None) -> None:
        self.engine = engine
        self.blob_id = blob_id
        self.size = size
        self.piece_size = piece_size
        self.priority = priority
        self._peer_source = peers
        self._progress = progress
        self._conns: dict[NodeId, _Conn] = {}
        self._dialing: set[NodeId] = set()
        self._last_dial: dict[NodeId, float] = {}
        self._partial: PartialBlob | None = None
        self._layer: PieceLayer | None = None
        self._picker: PiecePicker[NodeId] | None = None
        self._wake = asyncio.Event()
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.banned: set[NodeId] = set()
        self.bytes_done = 0
        self._rate_mark = (time.monotonic(), 0)
        self.rate = 0.0
        self._last_progress = time.monotonic()
        self._last_flush = time.monotonic()
        self._lease = LeaseId.new(f"swarm:{blob_id.short()}")
        self._pin = pin
        self._hellos: dict[NodeId, PeerHello] = {}
        self._pending_layer: PieceLayer | None = None
        self._layer_asked_from: NodeId | None = None
        self.last_ban: BadPeerDataError | None = None

    # --- state visible to the engine -------------------------------------------------------

    @property
    def partial(self) -> PartialBlob | None:
        return self._partial

    def have_bitfield(self) -> Bitfield:
        if self._picker is not None:
            return self._picker.have.copy()
        npieces = max(1, -(-self.size // self.piece_size))
        return Bitfield(npieces)

    def attach(self, conn: _Conn, hello: PeerHello) -> None:
        if conn.peer in self.banned:
            conn.close("banned for bad data")
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
        self._hellos[conn.peer] = hello
        if self._picker is not None:
            self._picker.add_peer(conn.peer, hello.have)
        self._wake.set()

    def detach(self, conn: _Conn, reason: str) -> None:
        if self._conns.get(conn.peer) is conn:
            self._forget(conn)
            log.debug("swarm %s: lost %s: %s", self.blob_id.short(), conn.peer.short(), reason)
        self._wake.set()

    def _forget(self, conn: _Conn) -> None:
        conn.job = None
        self._conns.pop(conn.peer, None)
        self._hellos.pop(conn.peer, None)
        if self._picker is not None:
            self._picker.remove_peer(conn.peer)

    async def on_event(self, conn: _Conn, event: object) -> None:
        if self._conns.get(conn.peer) is not conn:
            return
        if isinstance(event, LayerArrived):
            self._on_layer(conn, event.raw)
        elif isinstance(event, PeerHas):
            if self._picker is not None:
                self._picker.peer_has(conn.peer, event.index)
            self._wake.set()
        elif isinstance(event, PieceRefused):
            if self._picker is not None:
                self._picker.failed(conn.peer, event.index)
                if event.reason == REJECT_ELSEWHERE:
                    self._picker.defer(conn.peer, event.index)
            self._wake.set()
        elif isinstance(event, PieceArrived):
            await self._on_piece(conn, event.index, event.data)

    # --- the job ---------------------------------------------------------------------------

    async def run(self) -> None:
        store = self.engine.store
        try:
            await self.engine.gate.enter(self, self.priority)
            if store.has(self.blob_id):
                return
            try:
                layer = await asyncio.to_thread(store.piece_layer, self.blob_id)
            except BlobNotFoundError:
                layer = None
            if layer is not None:
                await self._start_with_layer(layer)
            await self._loop()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            await self._shutdown()
            await self.engine.gate.leave(self)
            self.done.set()

    async def _start_with_layer(self, layer: PieceLayer) -> None:
        self._layer = layer
        store = self.engine.store
        self._partial = await asyncio.to_thread(store.begin_partial, layer, self._lease)
        if self.engine.piece_index is not None:
            # pieces identical to pieces of blobs already here are copied, not fetched
            reused = await asyncio.to_thread(fill_from_index, self.engine.piece_index,
                                             self._partial)
            self.engine.bytes_reused += reused.bytes
        if self._pin is not None:
            await asyncio.to_thread(store.pin, self.blob_id, self._pin)
        have = self._partial.have
        self._picker = PiecePicker[NodeId](have)
        self.bytes_done = sum(layer.piece_range(i)[1] for i in have)
        for peer, hello in self._hellos.items():
            self._picker.add_peer(peer, hello.have)
        self._report()

    def _on_layer(self, conn: _Conn, raw: bytes) -> None:
        if self._layer is not None:
            return
        try:
            layer = PieceLayer.from_bytes(self.blob_id, self.size, self.piece_size, raw)
        except VerificationError:
            self._ban(conn, "sent a piece layer that does not match the blob id")
            return
        self._pending_layer = layer
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            if self._pending_layer is not None and self._layer is None:
                await self._start_with_layer(self._pending_layer)
            if self._picker is not None and self._picker.complete:
                await self._finish()
                return
            self._dial_more()
            if self._layer is None:
                await self._ask_layer()
            else:
                if self.engine.gate.blocked(self.priority):
                    await self.engine.gate.wait_turn(self.priority)
                await self._fill_pipelines()
            if time.monotonic() - self._last_progress > self.engine.config.stall_timeout:
                raise TransferError(
                    f"no progress on {self.blob_id.short()} for "
                    f"{self.engine.config.stall_timeout:.0f}s from {len(self._conns)} peer(s)",
                    blob_id=self.blob_id)
            if self._partial is not None and \
                    time.monotonic() - self._last_flush > self.engine.config.flush_interval:
                # bound what a crash can lose to about one interval of verified pieces
                self._last_flush = time.monotonic()
                await asyncio.to_thread(self._partial.flush)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.25)

    async def _ask_layer(self) -> None:
        if self._layer_asked_from in self._conns:
            return
        for peer, hello in self._hellos.items():
            if hello.has_layer:
                conn = self._conns[peer]
                self._layer_asked_from = peer
                with contextlib.suppress(TransportError):
                    await conn.send(conn.session.request_layer())
                return

    async def _fill_pipelines(self) -> None:
        picker = self._picker
        assert picker is not None
        # downloading peers first: what they can give need not cost a seed's upload
        conns = sorted(self._conns.values(), key=lambda c: c.session.peer_complete)
        for conn in conns:
            room = self.engine.config.pipeline - len(conn.session.outstanding)
            for index in picker.pick(conn.peer, room):
                try:
                    await conn.send(conn.session.request(index))
                except TransportError:
                    picker.failed(conn.peer, index)
                    break

    async def _on_piece(self, conn: _Conn, index: int, data: bytes) -> None:
        picker, partial = self._picker, self._partial
        if picker is None or partial is None:
            return
        await self.engine.down_bucket.take(len(data))
        try:
            wrote = await asyncio.to_thread(partial.write_piece, index, data)
        except VerificationError:
            self.engine.pieces_rejected += 1
            self._ban(conn, f"sent a corrupt piece {index}")
            return
        duplicates = picker.received(conn.peer, index)
        if wrote:
            self.bytes_done += len(data)
            self.engine.bytes_downloaded += len(data)
            self._last_progress = time.monotonic()
        for peer in duplicates:
            other = self._conns.get(peer)
            if other is not None:
                with contextlib.suppress(TransportError):
                    await other.send(other.session.cancel(index))
        for other in list(self._conns.values()):
            with contextlib.suppress(TransportError):
                await other.send(other.session.have(index))
        self._report()
        self._wake.set()

    def _ban(self, conn: _Conn, why: str) -> None:
        self.banned.add(conn.peer)
        self.engine.banned.setdefault(self.blob_id, set()).add(conn.peer)
        if self._picker is not None:
            self._picker.ban(conn.peer)
        log.warning("swarm %s: banning %s: %s", self.blob_id.short(), conn.peer.short(), why)
        self.last_ban = BadPeerDataError(f"peer {conn.peer} {why}", peer=conn.peer,
                                         blob_id=self.blob_id)
        conn.close(why)
        self._forget(conn)
        if self._layer_asked_from == conn.peer:
            self._layer_asked_from = None
        self._wake.set()

    def _dial_more(self) -> None:
        cfg = self.engine.config
        want = min(cfg.max_peers_per_blob - len(self._conns),
                   cfg.max_connections - self.engine.connections) - len(self._dialing)
        if want <= 0:
            return
        now = time.monotonic()
        me = self.engine.network.node_id
        for peer in self._peer_source():
            if want <= 0:
                break
            if peer == me or peer in self._conns or peer in self._dialing or \
                    peer in self.banned or \
                    now - self._last_dial.get(peer, -1e9) < cfg.peer_retry:
                continue
            self._last_dial[peer] = now
            self._dialing.add(peer)
            want -= 1
            self.engine._spawn(self._dial(peer))

    async def _dial(self, peer: NodeId) -> None:
        conn: _Conn | None = None
        try:
            stream = await self.engine.network.open_stream(peer, PROTOCOL)
            session = SwarmSession(self.blob_id, self.size, self.piece_size)
            conn = _Conn(stream, session, outbound=True)
            await conn.send(session.hello(self.have_bitfield(), self._layer is not None,
                                          int(self.priority)))
            event = session.receive(await stream.recv())
        except (TransportError, ProtocolError) as exc:
            log.debug("swarm %s: dial %s failed: %s", self.blob_id.short(), peer.short(), exc)
            if conn is not None:
                conn.close(str(exc))
            return
        finally:
            self._dialing.discard(peer)
            self._wake.set()
        assert isinstance(event, PeerHello)
        self.attach(conn, event)
        await self.engine._serve(conn, self.blob_id)

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
        if self._progress is not None and self._picker is not None:
            self._progress(JobProgress(self.bytes_done, self.size,
                                       self._picker.have.count(), self._picker.have.size,
                                       len(self._conns), self.rate))

    async def _shutdown(self) -> None:
        complete = self.engine.store.has(self.blob_id)
        for conn in list(self._conns.values()):
            self._forget(conn)
            if complete and not conn.session.peer_complete:
                continue  # keep seeding to a peer that still downloads
            with contextlib.suppress(TransportError, TimeoutError):
                await asyncio.wait_for(conn.send(conn.session.bye("done")), 1.0)
            conn.close("done")
        if self._partial is not None:
            with contextlib.suppress(OSError, StoreError):
                await asyncio.to_thread(self._partial.close)
        with contextlib.suppress(StoreError):
            self.engine.store.advise_lease_dropped(self._lease, self.blob_id)


__all__ = ["DownloadJob", "JobProgress", "PriorityGate", "SwarmConfig", "SwarmEngine"]
