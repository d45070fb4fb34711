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
import functools
import logging
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from blobmesh.distribution.config import SwarmConfig
from blobmesh.distribution.model import SOURCES_REPORTED, Priority, TargetState
from blobmesh.distribution.peerwire import (
    PROTOCOL,
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
from blobmesh.distribution.ratelimit import TokenBucket
from blobmesh.distribution.scheduler import (
    Announce,
    Ban,
    Cancel,
    Close,
    Complete,
    Dial,
    DownloadAction,
    DownloadScheduler,
    Flush,
    Refuse,
    Request,
    RequestLayer,
    Serve,
    StateChanged,
    UploadScheduler,
    max_unacked,
)
from blobmesh.errors import (
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
from blobmesh.hashing import BlobId, Buffer, PieceLayer
from blobmesh.store import Bitfield, LeaseId, PartialBlob, PieceReader, Store
from blobmesh.store.piece_index import PieceIndex, fill_from_index
from blobmesh.tasks import TaskOwner
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId
from blobmesh.transport.io import usable_cpus

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_OUTBOX = 8192  # messages queued per connection before it counts as not reading
HELLO_TIMEOUT = 10.0
NOT_READING = "peer does not read"
DISK_HEADROOM = 1 << 20  # free bytes kept for metadata when pieces fill a disk
# piece bytes received and not yet written, per download job, before its readers wait (at
# least a few pieces): the job's writer takes all that waits in one trip to a thread
WRITE_QUEUE_BYTES = 16 << 20


class BanKind(enum.StrEnum):
    """Why a peer was banned for a blob (the label of the ban metric)."""

    BAD_DATA = "bad-data"  # a piece or piece layer that failed verification
    UNRESPONSIVE = "unresponsive"  # let its requests expire again and again
    NOT_READING = "not-reading"  # read nothing we sent for ``send_timeout``


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
    # bytes/s received from each of ``sources`` (same order) over the same window as ``rate``
    source_rates: tuple[float, ...] = ()


PeerSource = Callable[[], Iterable[NodeId]]
ProgressCallback = Callable[[JobProgress], None]


class _Conn:
    """One stream with one peer about one blob.

    Everything we send goes through a bounded outbox drained by the connection's own writer
    task, so a peer that does not read blocks nobody but itself, and the reader never waits
    for a send.
    """

    def __init__(self, stream: Stream, session: SwarmSession, outbound: bool) -> None:
        self.stream = stream
        self.session = session
        self.outbound = outbound
        self.peer = stream.peer
        self.job: DownloadJob | None = None
        self.closed = False
        self.close_reason = ""
        # control messages (haves, requests, refusals) go before pieces not yet sent: a
        # have must not wait behind the piece data we upload to the same peer
        self._control: deque[bytes] = deque()
        # (head, message, piece index or -1): a piece's message is its head and its bytes
        self._pieces: deque[tuple[bytes, bytes | memoryview, int]] = deque()
        self._sending_control = False  # the writer is sending a control message
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    def push(self, message: bytes | memoryview, piece: int = -1, *, after_pieces: bool = False,
             head: bytes = b"") -> None:
        """Queue a message (``head + message``, not joined); never waits.  Pieces (``piece``
        >= 0), and messages that must follow them (``after_pieces``: a bye), go in order;
        other messages go before the pieces not yet sent.  A peer that lets the queue overflow
        is dropped."""
        if self.closed:
            return
        if piece < 0 and not after_pieces and not head and not self._control and \
                not self._sending_control and isinstance(message, bytes):
            # nothing queued to go first: straight to the transport if it takes it now
            try:
                if self.stream.try_send(message):
                    return
            except TransportError as exc:
                self.close(str(exc))
                return
        if len(self._control) + len(self._pieces) >= MAX_OUTBOX:
            self.close(f"{NOT_READING}: send queue full")
            return
        if piece >= 0 or after_pieces:
            self._pieces.append((head, message, piece))
        else:
            self._control.append(head + message)
        self._drained.clear()
        self._ready.set()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until everything queued was handed to the stream."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._drained.wait()

    async def run_writer(self, send_timeout: float,
                         on_piece_sent: Callable[[_Conn, int, int], None]) -> None:
        """Send what is queued until the connection closes: control messages first; each
        piece only once the one before it is written to the socket, so the transport holds
        little that a later control message would wait behind (its ``flush``)."""
        while not self.closed:
            head, piece = b"", -1
            message: bytes | memoryview = b""
            if self._control:
                message = self._control.popleft()
                self._sending_control = True
            elif self._pieces:
                head, message, piece = self._pieces.popleft()
            else:
                self._drained.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            try:
                async with asyncio.timeout(send_timeout):
                    await self.stream.send(message, flush=piece >= 0, head=head)
            except TimeoutError:
                self.close(f"{NOT_READING}: nothing read for {send_timeout:g}s")
                return
            except TransportError as exc:
                self.close(str(exc))
                return
            finally:
                self._sending_control = False
            if piece >= 0:
                on_piece_sent(self, piece, len(head) + len(message))
        self._drained.set()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._control.clear()
            self._pieces.clear()
            self._ready.set()
            self._drained.set()
            self.stream.reset(reason)


def piece_threads(upload_workers: int) -> int:
    """Piece threads of an engine: one per upload read in flight, but no more than there are
    CPUs.  Reads beyond that wait in the threads' queue (still ``upload_workers`` at most in
    flight): more threads running Python than CPUs only take turns at the GIL, each turn a
    wakeup (measured on 2 CPUs, 512 MiB from one source to four targets on loopback: node CPU
    per GiB delivered 7.2 -> 6.3 with 2 threads instead of 4, medians of 2, same period)."""
    return max(1, min(upload_workers, usable_cpus()))


class _PieceIo:
    """A few threads that read and write piece data for one engine: one queue in, one loop
    callback out per call, without ``asyncio.to_thread``'s executor, context copy and two
    chained futures (measured: about half its CPU per call, thousands of calls per GiB)."""

    def __init__(self, threads: int) -> None:
        self._size = max(1, threads)
        self._queue: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any],
                                             tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in one of the threads (started on first use)."""
        if len(self._threads) < self._size:
            t = threading.Thread(target=self._work, name=f"blobmesh-pieces-{len(self._threads)}",
                                 args=(asyncio.get_running_loop(),), daemon=True)
            t.start()
            self._threads.append(t)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fut, fn, args))
        return fut

    def close(self) -> None:
        """The threads end once the calls queued before are done."""
        for _ in self._threads:
            self._queue.put(None)
        self._threads.clear()

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if fut.cancelled():
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # delivered to the caller
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, result, error)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not fut.done():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


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
        # the transport's windows bound what is on the wire; see SwarmConfig.upload_slots
        self.uploads = UploadScheduler[_Conn, BlobId, NodeId](
            slots=self.config.upload_slots, send_timeout=self.config.send_timeout,
            max_slots=self.config.max_upload_slots)
        self._upload_ready = asyncio.Event()
        self._reads = 0  # uploads being read or waiting for the upload rate limit
        self._upload_timer: asyncio.TimerHandle | None = None
        self._upload_timer_at: float | None = None
        self._up_bucket = TokenBucket(self.config.upload_rate)
        self.down_bucket = TokenBucket(self.config.download_rate)
        self._tasks = TaskOwner("swarm")
        self.piece_io = _PieceIo(piece_threads(self.config.upload_workers))
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
        self.bytes_reused = 0  # piece bytes copied from other local blobs, not fetched
        self.pieces_rejected = 0
        self.connections_refused = 0
        self.requests_expired = 0  # requests re-issued elsewhere after their deadline
        # haves: messages sent and pieces they named (have-all names none), over all peers
        self.have_messages = 0
        self.pieces_announced = 0
        self.protocol_errors = 0  # connections ended because a peer broke the protocol
        self.banned: dict[BlobId, set[NodeId]] = {}
        self.ban_reasons: dict[BlobId, dict[NodeId, str]] = {}
        self.bans: collections.Counter[BanKind] = collections.Counter()
        self.corrupt: dict[BlobId, str] = {}  # local copies found corrupt (and quarantined)
        self._serving: dict[BlobId, set[_Conn]] = {}
        network.set_handler(PROTOCOL, self._on_stream)

    async def start(self) -> None:
        self._tasks.spawn_restarting(self._upload_loop, name="uploads")

    async def aclose(self) -> None:
        if self._upload_timer is not None:
            self._upload_timer.cancel()
        await self._tasks.aclose()
        self.piece_io.close()
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
        if peer in self.ban_reasons.get(blob_id, {}):
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
        the upload scheduler and the download job.

        A connection outlives the download job that opened it: once we hold the blob we keep
        serving the peer until it holds it too.
        """
        loop = asyncio.get_running_loop()
        uploads = self.uploads
        self._serving.setdefault(blob_id, set()).add(conn)
        uploads.open(conn, blob_id, conn.peer, conn.session.peer_have, loop.time(),
                     max_unacked(conn.session.piece_size))
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
                if isinstance(event, PeerHas):
                    self._acked(conn, event.indices)  # and on to the job, below
                if isinstance(event, PieceWanted):
                    refused = uploads.wanted(conn, event.index, int(self._prio(blob_id)),
                                             loop.time())
                    if refused is not None:
                        conn.push(conn.session.reject(refused.index, refused.reason))
                    else:
                        self._upload_ready.set()
                elif isinstance(event, WantCancelled):
                    uploads.cancelled(conn, event.index)
                    self._acked(conn, (event.index,))
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
                    conn.push(conn.session.bye("both complete"), after_pieces=True)
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
            uploads.close(conn)
            self._upload_ready.set()  # (its upload slots are free again)
            self._arm_uploads()
            if not serving:
                self._forget_blob(blob_id)
            if conn.job is not None:
                conn.job.detach(conn, conn.close_reason or "stream ended")
            conn.close("stream ended")
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _acked(self, conn: _Conn, indices: Iterable[int]) -> None:
        now, acked = asyncio.get_running_loop().time(), self.uploads.acked
        if [i for i in indices if acked(conn, i, now)]:  # (every one of them)
            self._upload_ready.set()
            self._arm_uploads()

    def _arm_uploads(self) -> None:
        """Keep one ``call_at`` at the upload scheduler's timer (peers that do not read)."""
        when = self.uploads.get_timer()
        if when == self._upload_timer_at:
            return
        if self._upload_timer is not None:
            self._upload_timer.cancel()
        self._upload_timer_at = when
        self._upload_timer = None if when is None else \
            asyncio.get_running_loop().call_at(when, self._on_upload_timer)

    def _on_upload_timer(self) -> None:
        self._upload_timer = self._upload_timer_at = None
        for close in self.uploads.handle_timer(asyncio.get_running_loop().time()):
            close.conn.close(f"{NOT_READING}: {close.reason}")
            self.uploads.close(close.conn)  # (its serve loop ends on its own)
        self._arm_uploads()

    def _forget_blob(self, blob_id: BlobId) -> None:
        """Drop what was kept for serving a blob nobody is connected about any more."""
        self._serving.pop(blob_id, None)
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

    async def _upload_loop(self) -> None:
        """Start the uploads the scheduler says go next: read and verify each in a piece
        thread, up to ``upload_workers`` at once, and queue it on its connection when read
        (:meth:`_piece_read`).  Never waits on a peer (the scheduler parks a connection whose
        outbox or unacknowledged pieces are full).  One task: a wakeup starts every upload
        that can go, instead of waking every idle worker for one piece.
        """
        while True:
            action = self.uploads.next() if self._reads < self.config.upload_workers else None
            if action is None:
                self._upload_ready.clear()
                await self._upload_ready.wait()
                continue
            conn = action.conn
            if isinstance(action, Refuse):
                conn.push(conn.session.reject(action.index, action.reason))
                continue
            self._reads += 1
            read = self.piece_io.run(self._read_piece, action.blob, action.index)
            read.add_done_callback(functools.partial(self._piece_read, action))

    def _piece_read(self, action: Serve[_Conn, BlobId], read: asyncio.Future[bytes]) -> None:
        """An upload's piece was read: queue it (after the upload rate limit, if any)."""
        if read.cancelled():
            self._read_done()
            return
        conn, exc = action.conn, read.exception()
        if exc is None:
            if self._up_bucket.rate > 0:
                self._spawn(self._push_limited(conn, action.index, read.result()),
                            name="upload-rate")
            else:
                self._push_piece(conn, action.index, read.result())
            return
        self._read_done()
        if not isinstance(exc, (StoreError, CorruptBlobError, OSError)):
            raise exc  # a bug: the loop's exception handler reports it
        # OSError: the file was closed under the read (the blob was dropped or its
        # download finished): the peer asks again elsewhere or here
        self.uploads.read_failed(conn)
        conn.push(conn.session.reject(action.index, str(exc)))
        if isinstance(exc, CorruptBlobError):
            self._spawn(self._on_corrupt(action.blob, exc), name="quarantine")

    async def _push_limited(self, conn: _Conn, index: int, data: bytes) -> None:
        try:
            await self._up_bucket.take(len(data))
        except BaseException:
            self._read_done()
            raise
        self._push_piece(conn, index, data)

    def _push_piece(self, conn: _Conn, index: int, data: bytes) -> None:
        self._read_done()
        conn.push(data, index, head=conn.session.piece_head(index, len(data)))

    def _read_done(self) -> None:
        """An upload's read (and rate limit) is over: another may start."""
        self._reads -= 1
        self._upload_ready.set()

    def _piece_sent(self, conn: _Conn, index: int, nbytes: int) -> None:
        """A connection's writer handed a piece to the transport."""
        self.uploads.sent(conn, index, asyncio.get_running_loop().time())
        self.bytes_uploaded += nbytes
        self._upload_ready.set()
        self._arm_uploads()

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

    Every decision (whom to dial, what to request where, deadlines, end game, bans, stalls,
    flushes) is the :class:`DownloadScheduler`'s; the job feeds it the events of its
    connections with the loop's ``now``, executes its actions, and keeps one ``call_at``
    armed for its timer.  What needs awaiting (the partial blob, flushes, the disk, the
    priority gate) runs in :meth:`run`, woken by the actions that ask for it.
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
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._progress = progress
        self.sched = DownloadScheduler[_Conn, NodeId](
            max(1, -(-size // piece_size)), engine.network.node_id,
            lambda: list(peers()), now, cfg.download_policy(),
            free_connections=lambda: cfg.max_connections - engine.connections,
            banned=engine.banned.setdefault(blob_id, set()))
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._partial: PartialBlob | None = None
        self._layer: PieceLayer | None = None
        self._wake = asyncio.Event()
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.bytes_done = 0
        self._rate_mark = (now, 0)
        self.rate = 0.0
        # bytes received from each peer since the rate mark, and the rates of the last window
        self._received: collections.Counter[NodeId] = collections.Counter()
        self._peer_rates: dict[NodeId, float] = {}
        self._lease = LeaseId.new(f"swarm:{blob_id.short()}")
        self._pin = pin
        self._pending_layer: PieceLayer | None = None
        self._flush_due = False
        self._complete = False
        self._failed = ""
        self._closing = False  # shutting down: the scheduler's actions are not executed
        self._disk_full = False
        self.state = TargetState.TRANSFERRING
        self.reason = ""
        self._ban_note = ""
        # pieces received, to be verified and written by ``_write_loop``
        self._writes: list[tuple[_Conn, int, Buffer]] = []
        self._write_bytes = 0
        self._write_limit = max(WRITE_QUEUE_BYTES, 4 * piece_size)
        self._write_wake = asyncio.Event()
        self._write_room = asyncio.Event()
        self._write_room.set()
        self._writer: asyncio.Task[None] | None = None

    # --- state visible to the engine -------------------------------------------------------

    @property
    def partial(self) -> PartialBlob | None:
        return self._partial

    def have_bitfield(self) -> Bitfield:
        picker = self.sched.picker
        return picker.have.copy() if picker is not None else Bitfield(self.sched.pieces)

    # --- events in, actions out ------------------------------------------------------------

    def attach(self, conn: _Conn, hello: PeerHello) -> None:
        self._bind(conn, True)
        self._execute(self.sched.attach(conn, conn.peer, conn.session.peer_have,
                                        hello.has_layer, conn.outbound, self._loop.time()))
        if not self.sched.owns(conn):
            self._bind(conn, False)

    def detach(self, conn: _Conn, reason: str) -> None:
        if self.sched.owns(conn):
            log.debug("swarm %s: lost %s: %s", self.blob_id.short(), conn.peer.short(), reason)
        self._bind(conn, False)
        self._execute(self.sched.detach(conn, self._loop.time()))

    def _bind(self, conn: _Conn, downloading: bool) -> None:
        """Route the connection's events to this job (or not); a seed never redirects a
        peer we download from."""
        conn.job = self if downloading else None
        self.engine.uploads.set_downloading(conn, downloading)

    async def on_event(self, conn: _Conn, event: Event) -> None:
        sched, now = self.sched, self._loop.time()
        if isinstance(event, LayerArrived):
            self._execute(sched.layer_arrived(conn, self._on_layer(event.raw), now))
        elif isinstance(event, PeerHas):
            self._execute(sched.peer_has(conn, event.indices, now))
        elif isinstance(event, PieceRefused):
            self._execute(sched.refused(conn, event.index, event.reason, now))
        elif isinstance(event, PieceArrived):
            await self._on_piece(conn, event.index, event.data)

    def _on_layer(self, raw: bytes) -> bool:
        """Whether a piece layer that arrived is valid (a late copy counts as valid)."""
        if self._layer is not None or self._pending_layer is not None:
            return True
        try:
            self._pending_layer = PieceLayer.from_bytes(self.blob_id, self.size,
                                                        self.piece_size, raw)
        except VerificationError:
            return False
        self._wake.set()
        return True

    async def _on_piece(self, conn: _Conn, index: int, data: Buffer) -> None:
        """Queue a piece for the job's writer; the connection's reader waits only while the
        queue is full."""
        partial = self._partial
        if not self.sched.piece_arrived(conn, index, self._loop.time()) or partial is None:
            return  # a late copy nobody needs any more, or one we cannot store now
        await self.engine.down_bucket.take(len(data))
        self._writes.append((conn, index, data))
        self._write_bytes += len(data)
        if self._writer is None:
            self._writer = self.engine._spawn(self._write_loop(),
                                              name=f"write-{self.blob_id.short()}")
        self._write_wake.set()
        if self._write_bytes >= self._write_limit:
            self._write_room.clear()
            await self._write_room.wait()

    async def _write_loop(self) -> None:
        """Verify and write the queued pieces, all that wait in one trip to a thread, then
        tell the scheduler how each one went."""
        while True:
            if not self._writes:
                self._write_wake.clear()
                await self._write_wake.wait()
                continue
            batch, self._writes = self._writes, []
            partial = self._partial
            try:
                # (complete: what still comes is late copies, and the partial blob closes)
                results = [] if partial is None or self._closing or self.sched.done else \
                    await self.engine.piece_io.run(self._write_batch, partial, batch)
            finally:
                self._write_bytes -= sum(len(data) for _, _, data in batch)
                if self._write_bytes < self._write_limit:
                    self._write_room.set()
            if self._partial is not partial or not results:
                continue  # the download ended (cancelled, say) under these writes
            now = self._loop.time()
            for (conn, index, data), result in zip(batch, results, strict=True):
                if isinstance(result, VerificationError):
                    self.engine.pieces_rejected += 1
                    if self.sched.owns(conn):
                        self._execute(self.sched.piece_corrupt(conn, index, now))
                    elif not self.engine.is_banned(self.blob_id, conn.peer):
                        # gone meanwhile (say, banned for an earlier piece of this batch)
                        self._on_ban(conn.peer, BanKind.BAD_DATA,
                                     f"sent a corrupt piece {index}")
                elif isinstance(result, StoreFullError):  # (an OSError too: first)
                    self._execute(self.sched.piece_failed(conn, index, now))
                    self._enter_disk_full()
                elif isinstance(result, BaseException):
                    log.error("swarm %s: writing piece %d failed: %s", self.blob_id.short(),
                              index, result)
                    conn.close(f"writing piece {index} failed: {result}")
                else:
                    if result:
                        self.bytes_done += len(data)
                        self._received[conn.peer] += len(data)
                        self.engine.bytes_downloaded += len(data)
                    self._execute(self.sched.piece_written(conn, index, result, now))
            self._report()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._execute(self.sched.handle_timer(self._loop.time()))

    def _execute(self, actions: list[DownloadAction[NodeId, _Conn]]) -> None:
        """Carry out the scheduler's actions, then re-arm its timer."""
        if self._closing:
            return
        for a in actions:
            if isinstance(a, Request):
                a.conn.push(a.conn.session.request(a.index))
            elif isinstance(a, Announce):
                session = a.conn.session
                a.conn.push(session.have_all() if a.indices is None else
                            session.haves(a.indices))
                self.engine.have_messages += 1
                self.engine.pieces_announced += len(a.indices or ())
            elif isinstance(a, Cancel):
                a.conn.push(a.conn.session.cancel(a.index))
                if a.late:
                    self.engine.requests_expired += 1
            elif isinstance(a, RequestLayer):
                a.conn.push(a.conn.session.request_layer())
            elif isinstance(a, Dial):
                self.engine._spawn(self._dial(a.peer), name=f"dial-{a.peer.short()}")
            elif isinstance(a, Close):
                a.conn.close(a.reason)
            elif isinstance(a, Ban):
                self._on_ban(a.peer, BanKind(a.kind), a.why)
            elif isinstance(a, StateChanged):
                self._set_state(TargetState.STALLED if a.stalled else TargetState.TRANSFERRING,
                                a.reason)
            else:  # Flush, Complete, Failed: awaited by ``run``
                if isinstance(a, Flush):
                    self._flush_due = True
                elif isinstance(a, Complete):
                    self._complete = True
                else:
                    self._failed = a.reason
                self._wake.set()
        self._arm()

    def _arm(self) -> None:
        when = self.sched.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = None if when is None else self._loop.call_at(when, self._on_timer)

    def _on_ban(self, peer: NodeId, kind: BanKind, why: str) -> None:
        self.engine.ban(self.blob_id, peer, kind, why)
        self._ban_note = f"banned {len(self.sched.banned)} peer(s), last {peer.short()}: {why}"
        if self.state is TargetState.TRANSFERRING:
            self._set_state(TargetState.TRANSFERRING)

    # --- the job ---------------------------------------------------------------------------

    async def run(self) -> None:
        store = self.engine.store
        try:
            await self.engine.gate.enter(self, self.priority)
            for job in self.engine._jobs.values():  # a lower priority may have to wait now
                job._wake.set()
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
            await self._drive()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            await self._shutdown()
            await self.engine.gate.leave(self)
            self.done.set()

    async def _check_local_copy(self) -> None:
        """A copy that is already here counts only once it verifies (or verified recently,
        ``SwarmConfig.reverify_after``); a rotten one goes."""
        store = self.engine.store
        try:
            await store.aio.verify(self.blob_id, self._lease,
                                   max_age=self.engine.config.reverify_after)
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
        if self.engine.piece_index is not None:
            # pieces identical to pieces of blobs already here are copied, not fetched
            reused = await asyncio.to_thread(fill_from_index, self.engine.piece_index, partial)
            self.engine.bytes_reused += reused.bytes
        if self._pin is not None:
            await asyncio.to_thread(store.pin, self.blob_id, self._pin)
        have = partial.have
        self.bytes_done = sum(layer.piece_range(i)[1] for i in have)
        self._execute(self.sched.start(have, self._loop.time()))
        self._report()

    async def _drive(self) -> None:
        gate = self.engine.gate
        self._execute(self.sched.handle_timer(self._loop.time()))  # the first dials
        while True:
            self._wake.clear()
            try:
                if self._pending_layer is not None and self._layer is None:
                    await self._start_with_layer(self._pending_layer)
                if self._complete:
                    await self._finish()
                    return
                if self._flush_due and self._partial is not None:
                    # bound what a crash can lose to about one interval of verified pieces
                    self._flush_due = False
                    await asyncio.to_thread(self._partial.flush)
            except StoreFullError:
                self._enter_disk_full()
            if self._failed:
                raise TransferError(f"{self.blob_id.short()}: {self._failed}",
                                    blob_id=self.blob_id)
            if self._disk_full:
                await self._wait_for_disk()
                continue
            if self._layer is not None and gate.blocked(self.priority):
                self.sched.hold()
                self._arm()
                self._set_state(TargetState.QUEUED, "waiting for a higher-priority distribution")
                await gate.wait_turn(self.priority)
                self._set_state(TargetState.TRANSFERRING)
                self._execute(self.sched.resume(self._loop.time()))  # queued time is no stall
                continue
            await self._wake.wait()

    def _set_state(self, state: TargetState, reason: str = "") -> None:
        if state is TargetState.TRANSFERRING and not reason:
            reason = self._ban_note  # moving, though some peer had to be banned
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason = state, reason
            self._report()

    def _enter_disk_full(self) -> None:
        if self._disk_full:
            return
        self._disk_full = True
        picker = self.sched.picker
        log.warning("swarm %s: disk full; keeping %d verified piece(s), waiting for space",
                    self.blob_id.short(), picker.have.count() if picker is not None else 0)
        # what is still in flight could not be stored
        self._execute(self.sched.pause(self._loop.time()))
        self._set_state(TargetState.WAITING_DISK, "disk full")
        self._wake.set()

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
        self._set_state(TargetState.TRANSFERRING)
        self._execute(self.sched.resume(self._loop.time()))  # waiting for disk is no stall

    def _write_batch(self, partial: PartialBlob, batch: list[tuple[_Conn, int, Buffer]]
                     ) -> list[bool | OSError | VerificationError]:
        """Verify and write pieces (in a worker thread): for each, whether it was new, or what
        went wrong.  Room is left for the store's metadata: a disk filled to the last byte
        could not even record the pieces already written."""
        try:
            free = shutil.disk_usage(self.engine.store.home).free
        except OSError as exc:
            return [exc] * len(batch)
        out: list[bool | OSError | VerificationError] = []
        for _, index, data in batch:
            if free < len(data) + DISK_HEADROOM:
                out.append(StoreFullError(f"disk full writing {self.blob_id.short()}",
                                          blob_id=self.blob_id))
                continue
            try:
                wrote = partial.write_piece(index, data)
            except (VerificationError, OSError) as exc:
                out.append(exc)
                continue
            if wrote:
                free -= len(data)
            out.append(wrote)
        return out

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
            self._execute(self.sched.dial_ended(peer, self._loop.time()))
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
        self._report()

    def _report(self) -> None:
        now = self._loop.time()
        t0, b0 = self._rate_mark
        if now - t0 >= 0.5:
            self.rate = (self.bytes_done - b0) / (now - t0)
            self._rate_mark = (now, self.bytes_done)
            self._peer_rates = {p: n / (now - t0) for p, n in self._received.items()}
            self._received.clear()
        if self._progress is not None:
            picker = self.sched.picker
            busy = sorted((c for c in self.sched.conns() if self.sched.outstanding(c)),
                          key=self.sched.outstanding, reverse=True)
            sources = tuple(c.peer for c in busy[:SOURCES_REPORTED])
            self._progress(JobProgress(self.bytes_done, self.size,
                                       picker.have.count() if picker else 0,
                                       picker.have.size if picker else 0,
                                       self.sched.connections, self.rate, self.state,
                                       self.reason, sources,
                                       tuple(self._peer_rates.get(p, 0.0) for p in sources)))

    async def _shutdown(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._writes.clear()  # pieces still arriving are dropped
        self._write_room.set()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        complete = self.engine.store.has(self.blob_id)
        for conn in self.sched.conns():
            self._bind(conn, False)
            if complete and not conn.session.peer_complete:
                continue  # keep seeding to a peer that still downloads
            conn.push(conn.session.bye("done"), after_pieces=True)
            await conn.drain(1.0)
            conn.close("done")
        partial, self._partial = self._partial, None  # pieces still arriving are dropped
        if partial is not None:
            with contextlib.suppress(OSError, StoreError):
                await asyncio.to_thread(partial.close)
        with contextlib.suppress(StoreError):
            self.engine.store.advise_lease_dropped(self._lease, self.blob_id)


__all__ = ["BanKind", "DownloadJob", "JobProgress", "PriorityGate", "SwarmConfig", "SwarmEngine"]
