"""The asyncio data-transfer manager: channels over a :class:`~blobmesh.transport.Network`.

It wraps the sans-I/O :class:`~blobmesh.transfer.channel.Channel` with streams, the store,
validators, persistence and a monitor.  Task ownership: the manager owns initiator sessions
and the monitor (cancelled and awaited by :meth:`TransferManager.aclose`); each session owns
its receive, send, write and flush tasks (a task group); responder sessions run inside the
transport's per-stream handler task and end when the manager resets their streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blobmesh.errors import (
    BadPeerDataError,
    BlobIncompleteError,
    BlobmeshError,
    BlobNotFoundError,
    CorruptBlobError,
    ProtocolError,
    StoreFullError,
    TransferError,
    TransportError,
    VerificationError,
    VoucherRejectedError,
)
from blobmesh.hashing import BlobId, Buffer, PieceLayer
from blobmesh.store import Bitfield, LeaseId, PieceReader, Store
from blobmesh.tasks import TaskOwner
from blobmesh.transfer.batch import BATCH_PROTOCOL
from blobmesh.transfer.batching import BatchService, raise_failure
from blobmesh.transfer.channel import (
    TERMINAL,
    Channel,
    ChannelId,
    ChannelRecord,
    ChannelState,
    Event,
    Status,
    Step,
    Voucher,
)
from blobmesh.transfer.messages import (
    MAX_CHUNK,
    PROTOCOL,
    Error,
    Message,
    Request,
    Selector,
    data_head,
    decode,
    encode,
)
from blobmesh.transfer.persist import ChannelDB
from blobmesh.transfer.pieces import PieceSink
from blobmesh.transfer.validation import Decision, Revalidator, Validator, Verdict
from blobmesh.transport.api import Network, Stream
from blobmesh.transport.identity import NodeId

log = logging.getLogger(__name__)

READ_AHEAD = 4
"""Pieces a sender reads in one trip to an I/O thread (and at most keeps read ahead)."""
QUEUE_PIECES = 16
"""Received pieces waiting for the writer thread (at most 64 MiB at the largest piece size)."""

Subscriber = Callable[[Event, ChannelState], None]
Unsubscribe = Callable[[], None]


@dataclass(slots=True)
class TransferConfig:
    """Tuning knobs; the defaults suit a LAN or a datacenter."""

    window: int = 64 * 1024 * 1024
    """Unacknowledged bytes a sender may have in flight (and so at most re-sends after a
    crash).  Large, because acknowledgements wait for fdatasync and a SQLite commit."""
    flush_bytes: int = 16 * 1024 * 1024
    """The receiver makes pieces durable and acknowledges them every this many bytes..."""
    flush_interval: float = 0.1
    """...or after this many seconds."""
    stall_timeout: float = 30.0
    """A channel that should move but has not for this long becomes Stalled."""
    tick: float = 1.0
    restart_backoff: float = 0.5
    restart_backoff_max: float = 30.0
    max_idle_restarts: int = 5
    """Consecutive restarts that move no data before the channel fails."""
    auto_restart: bool = True
    verify_reads: bool = True
    """Senders re-verify pieces read from disk, so local rot is never blamed on us."""
    chunk: int = MAX_CHUNK
    retention: float = 3600.0
    """Finished (completed, failed, cancelled) channels are forgotten this long after their
    last update, in memory and in ``transfer.sqlite``; a responder channel whose initiator
    has not come back for this long fails (and is forgotten one retention later)."""


class _Session:
    """One stream carrying one channel."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.send_lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.over = asyncio.Event()
        self.ended = asyncio.Event()
        self.sink: PieceSink | None = None
        self.writes: asyncio.Queue[tuple[int, Buffer]] = asyncio.Queue(QUEUE_PIECES)
        self.unflushed: list[int] = []
        self.unflushed_bytes = 0
        self.flush_now = asyncio.Event()

    async def send(self, msgs: list[Message]) -> None:
        async with self.send_lock:
            for m in msgs:
                await self.stream.send(encode(m))


@dataclass(slots=True)
class _Live:
    ch: Channel
    session: _Session | None = None
    runner: asyncio.Task[Any] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    next_restart: float = 0.0
    saved_status: Status | None = None
    saved_update: float = 0.0


class TransferManager:
    """Push and pull channels between this node and its peers, with vouchers and restarts.

    Use as ``async with TransferManager(network, store) as mgr:``.
    """

    def __init__(self, network: Network, store: Store, *, db_path: Path | None = None,
                 config: TransferConfig | None = None,
                 clock: Callable[[], float] = time.time,
                 admit: Callable[[NodeId], bool] | None = None) -> None:
        """``admit(peer)``, if given, decides who may open channels here at all (e.g. members
        of the node's space); others are refused before their request is read."""
        self.network = network
        self.store = store
        self._lease = LeaseId.new("transfer")  # holds what we receive while we run
        self.config = config or TransferConfig()
        self.clock = clock
        self._db = ChannelDB(db_path or store.home / "transfer.sqlite")
        self._validators: dict[str, Validator] = {}
        self._revalidators: dict[str, Revalidator] = {}
        self._live: dict[ChannelId, _Live] = {}
        self._subscribers: list[Subscriber] = []
        self._dirty: set[ChannelId] = set()
        self._tasks = TaskOwner("transfer")
        self._closing = False
        self._admit = admit
        self.refused_unadmitted = 0  # streams refused before reading: peer not admitted
        self.requests_refused = 0    # requests the validators refused (nothing kept)
        self.channels_pruned = 0     # finished channel rows deleted after the retention
        # batched pulls of small blobs (its counters: blobs_served, refused_unadmitted)
        self.batches = BatchService(network, store, self._lease, self.config,
                                     self._validators, self._revalidators, admit)

    @property
    def node_id(self) -> NodeId:
        return self.network.node_id

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, *, resume: bool = True) -> None:
        """Serve requests and take over channels persisted by an earlier process.

        With ``resume``, channels we initiated restart by themselves (monitoring resumes
        after a process restart); otherwise they wait for :meth:`restart`.
        """
        self.network.set_handler(PROTOCOL, self._handle_stream)
        self.network.set_handler(BATCH_PROTOCOL, self.batches.serve)
        for rec in self._db.load_active():
            live = self._adopt(rec)
            await self._apply(live, live.ch.disconnected("process restarted"))
            live.next_restart = self.clock() if resume else float("inf")
        self._tasks.spawn_restarting(self._monitor, name="monitor")

    async def aclose(self) -> None:
        """Stop every session (channels stay resumable) and the monitor."""
        self._closing = True
        self.batches.reset_all("shutting down")
        for live in self._live.values():
            if live.session is not None:
                live.session.stream.reset("shutting down")
        await self._tasks.aclose()
        for live in list(self._live.values()):
            if live.session is not None:
                await live.session.ended.wait()
        self._db.save_many([live.ch.rec for live in self._live.values()])
        self._db.close()

    async def __aenter__(self) -> TransferManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name="initiator")

    # --- registration and events ---------------------------------------------------------

    def register_voucher_type(self, voucher_type: str, validator: Validator) -> None:
        """Validate requests carrying vouchers of ``voucher_type`` with ``validator``;
        requests with unregistered voucher types are rejected."""
        if voucher_type in self._validators:
            raise TransferError(f"voucher type {voucher_type!r} is already registered")
        self._validators[voucher_type] = validator

    def register_revalidator(self, voucher_type: str, revalidator: Revalidator) -> None:
        """Revalidate channels opened with ``voucher_type`` vouchers (responder side)."""
        self._revalidators[voucher_type] = revalidator

    def subscribe(self, subscriber: Subscriber) -> Unsubscribe:
        """Call ``subscriber(event, state)`` for every event; returns the unsubscribe."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(subscriber)

        return unsubscribe

    async def events(self) -> AsyncGenerator[tuple[Event, ChannelState], None]:
        """Every event from now on, as an async iterator (close it, e.g. with
        ``contextlib.aclosing``, to unsubscribe)."""
        queue: asyncio.Queue[tuple[Event, ChannelState]] = asyncio.Queue()
        unsubscribe = self.subscribe(lambda e, s: queue.put_nowait((e, s)))
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    def _publish(self, ch: Channel, events: list[Event]) -> None:
        if not events or not self._subscribers:
            return
        state = ch.snapshot()
        for event in events:
            for sub in list(self._subscribers):
                try:
                    sub(event, state)
                except Exception:
                    log.exception("transfer event subscriber failed")

    # --- queries -------------------------------------------------------------------------

    def channel_state(self, chid: ChannelId) -> ChannelState:
        return self._get(chid).ch.snapshot()

    def status(self, chid: ChannelId) -> Status:
        live = self._live.get(chid)
        return Status.CHANNEL_NOT_FOUND if live is None else live.ch.status

    def in_progress_channels(self) -> dict[ChannelId, ChannelState]:
        return {cid: live.ch.snapshot() for cid, live in self._live.items()
                if not live.ch.terminal}

    async def wait(self, chid: ChannelId) -> ChannelState:
        """Wait until the channel ends; its final state, or its typed error."""
        live = self._get(chid)
        await live.finished.wait()
        return self._outcome(live.ch)

    def _outcome(self, ch: Channel) -> ChannelState:
        state = ch.snapshot()
        r = ch.rec
        if state.status is Status.COMPLETED:
            return state
        if state.status is Status.CANCELLED:
            raise TransferError(f"channel {ch.id} was cancelled: {r.message}", channel=ch.id)
        if r.error_kind == "rejected":
            raise VoucherRejectedError(r.message, channel=ch.id)
        if r.error_kind == "bad_data":
            raise BadPeerDataError(r.message, channel=ch.id, peer=NodeId.parse(r.bad_peer))
        if r.error_kind == "not_found":
            raise BlobNotFoundError(r.message, channel=ch.id, blob_id=ch.blob_id)
        if r.error_kind == "store_full":
            raise StoreFullError(r.message, channel=ch.id)
        raise TransferError(r.message or f"channel {ch.id} failed", channel=ch.id)

    def _get(self, chid: ChannelId) -> _Live:
        live = self._live.get(chid)
        if live is None:
            raise TransferError(f"channel {chid} not found", channel=chid)
        return live

    # --- opening -------------------------------------------------------------------------

    async def open_pull(self, peer: NodeId, voucher: Voucher, blob_id: BlobId,
                        selector: Selector | None = None) -> ChannelId:
        """Ask ``peer`` to send us (part of) a blob; returns at once with the channel id."""
        layer = await self.store.aio.piece_layer(blob_id)
        return self._open(peer, True, voucher, blob_id, selector or Selector(), layer)

    async def open_push(self, peer: NodeId, voucher: Voucher, blob_id: BlobId,
                        selector: Selector | None = None) -> ChannelId:
        """Offer (part of) a blob we hold to ``peer``; returns at once with the channel id."""
        layer = await self.store.aio.piece_layer(blob_id)
        if layer is None:
            raise BlobNotFoundError(f"blob {blob_id} is not in the store", blob_id=blob_id)
        return self._open(peer, False, voucher, blob_id, selector or Selector(), layer)

    def _open(self, peer: NodeId, pull: bool, voucher: Voucher, blob_id: BlobId,
              selector: Selector, layer: PieceLayer | None) -> ChannelId:
        chid = ChannelId(self.node_id, peer, secrets.randbits(63))
        ch = Channel.initiate(chid, pull, blob_id, selector, voucher, self.clock, layer)
        live = _Live(ch)
        self._live[chid] = live
        live.runner = self._spawn(self._run_initiator(live))
        return chid

    def _adopt(self, rec: ChannelRecord) -> _Live:
        live = _Live(Channel(rec, self.clock))
        self._live[live.ch.id] = live
        return live

    async def pull_many(self, peer: NodeId, voucher: Voucher, blob_ids: Iterable[BlobId], *,
                        channels: int = 8) -> list[BlobId]:
        """Pull every blob of ``blob_ids`` not here yet from ``peer``: small ones over one
        batch stream (``blobmesh/transfer-batch/1``: no channel, no ``transfer.sqlite`` row,
        one commit per batch), larger ones through channels, ``channels`` at a time.  Returns
        the ids it stored.  Whatever verifies is kept; then the first failure is raised:
        BlobNotFoundError, VoucherRejectedError, BadPeerDataError, a ProtocolError, or a
        TransferError (a broken-off batch, a failed channel).  Running it again fetches only
        what is still missing."""
        ids = list(dict.fromkeys(blob_ids))
        here = await self.store.aio.complete_sizes(ids)
        result = await self.batches.pull(peer, voucher, [b for b in ids if b not in here])
        large = [s.blob_id for s in result.skipped if s.code == "too_large"]
        sem = asyncio.Semaphore(channels)

        async def one(blob_id: BlobId) -> None:
            async with sem:
                await self.wait(await self.open_pull(peer, voucher, blob_id))

        outcomes = await asyncio.gather(*(one(b) for b in large), return_exceptions=True)
        raise_failure(peer, result)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return result.stored + large

    # --- commands ------------------------------------------------------------------------

    async def pause(self, chid: ChannelId) -> None:
        live = self._get(chid)
        await self._apply(live, live.ch.pause())

    async def resume(self, chid: ChannelId) -> None:
        live = self._get(chid)
        await self._apply(live, live.ch.resume())

    async def send_voucher(self, chid: ChannelId, voucher: Voucher) -> None:
        """Answer a revalidation demand with a new voucher."""
        live = self._get(chid)
        await self._apply(live, live.ch.send_voucher(voucher))

    async def close(self, chid: ChannelId, reason: str = "cancelled") -> None:
        """Cancel the channel; works on any channel, connected, stalled or dead."""
        live = self._get(chid)
        await self._apply(live, live.ch.cancel(reason))

    async def restart(self, chid: ChannelId) -> None:
        """Restart a channel we initiated (also a paused or stalled one), moving only the
        pieces the receiver has not verified yet."""
        live = self._get(chid)
        if not live.ch.is_initiator:
            raise TransferError(f"only the initiator restarts channel {chid}; "
                                "the responder waits for it", channel=chid)
        if live.ch.terminal:
            raise TransferError(f"channel {chid} is {live.ch.status.value}", channel=chid)
        await self._stop_runner(live)
        live.runner = self._spawn(self._run_initiator(live))

    async def _stop_runner(self, live: _Live) -> None:
        # cancel first, then reset: reset first, the session saw a broken stream, marked the
        # channel stalled and scheduled a restart of its own beside the one asked for
        sess = live.session
        if live.runner is not None and not live.runner.done():
            live.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.runner
        if sess is not None:
            sess.stream.reset("restarting")

    # --- sessions ------------------------------------------------------------------------

    async def _run_initiator(self, live: _Live) -> None:
        ch = live.ch
        ch.note_restart_attempt()
        have: Bitfield | None = None
        if not ch.is_sender:
            have = await self.store.aio.bitfield(ch.blob_id)
        try:
            stream = await self.network.open_stream(ch.id.responder, PROTOCOL)
        except (TransportError, OSError) as exc:
            await self._apply(live, ch.disconnected(str(exc)))
            self._schedule_restart(live)
            return
        if ch.terminal:  # cancelled while we dialed
            stream.reset("cancelled")
            return
        await self._session(live, _Session(stream), ch.request(have))

    async def _handle_stream(self, stream: Stream) -> None:
        """Responder: the first message on a new stream is a request.

        Nothing is kept for a peer that is not admitted, nor for a request the validator
        refuses: a channel enters the table (and ``transfer.sqlite``) only once accepted.
        """
        if self._admit is not None and not self._admit(stream.peer):
            self.refused_unadmitted += 1
            await self._refuse(_Session(stream), f"{stream.peer.short()} is not admitted: not "
                               "a member of this space")
            return
        try:
            async with asyncio.timeout(self.config.stall_timeout):
                raw = await stream.recv()
            req = decode(raw)
        except (TransportError, ProtocolError, TimeoutError) as exc:
            stream.reset(str(exc))
            return
        sess = _Session(stream)
        if not isinstance(req, Request):
            await self._refuse(sess, f"expected a request, got {type(req).__name__}")
            return
        chid = ChannelId(stream.peer, self.node_id, req.transfer_id)
        try:
            live, new = await self._responder_channel(chid, req)
        except BlobmeshError as exc:
            await self._refuse(sess, str(exc))
            return
        step = await self._validate(live, req, sess)
        if new:
            if live.ch.terminal:  # refused: answer, keep nothing
                self.requests_refused += 1
                if sess.sink is not None:
                    await self.store.aio.io(sess.sink.close)
                with contextlib.suppress(TransportError):
                    await sess.send(step.send)
                    await stream.close()
                self._publish(live.ch, step.events)
                return
            if chid in self._live:  # the same id accepted meanwhile on another stream
                await self._refuse(sess, f"transfer id {chid.transfer_id} is already in use")
                return
            self._live[chid] = live
        await self._session(live, sess, step)

    async def _refuse(self, sess: _Session, message: str) -> None:
        with contextlib.suppress(TransportError):
            await sess.send([Error(message)])
            await sess.stream.close()

    async def _responder_channel(self, chid: ChannelId, req: Request) -> tuple[_Live, bool]:
        """The channel ``req`` opens or restarts, and whether it is new (not in the table)."""
        live = self._live.get(chid)
        if live is None and req.restart:
            rec = self._db.get(f"{chid.initiator}/{chid.responder}/{chid.transfer_id}")
            if rec is not None:
                live = self._adopt(rec)
        if live is None:
            return _Live(Channel.respond(req, chid.initiator, chid.responder, self.clock)), True
        if not req.restart:
            raise ProtocolError(f"transfer id {chid.transfer_id} is already in use")
        # the initiator restarts: whatever stream we still have for it is stale
        if live.session is not None:
            live.session.stream.reset("replaced by a restart")
            await live.session.ended.wait()
        live.ch.restarted(req)
        return live, False

    async def _validate(self, live: _Live, req: Request, sess: _Session) -> Step:
        ch = live.ch
        voucher = ch.rec.vouchers[-1]
        validator = self._validators.get(voucher.type)
        if validator is None:
            return ch.reject(f"unknown voucher type {voucher.type!r}")
        peer = ch.id.initiator
        try:
            if ch.rec.pull:
                decision = validator.validate_pull(req.restart, ch.id, peer, voucher,
                                                   ch.blob_id, ch.rec.selector)
            else:
                decision = validator.validate_push(req.restart, ch.id, peer, voucher,
                                                   ch.blob_id, ch.rec.selector)
        except Exception as exc:
            log.exception("validator failed")
            return ch.reject(f"validator failed: {exc}")
        if decision.verdict is Verdict.REJECT:
            return ch.reject(decision.message or "voucher rejected", decision.result)
        paused = decision.verdict is Verdict.PAUSE
        if ch.is_sender:
            layer = await self.store.aio.piece_layer(ch.blob_id)
            ours = await self.store.aio.bitfield(ch.blob_id)
            if layer is None or ours is None:
                return ch.reject(f"blob {ch.blob_id} is not here", code="not_found")
            try:
                wanted = ch.rec.selector.resolve(layer.size, layer.piece_size)
                have = Bitfield(len(layer), req.have) if req.have is not None else None
            except (ProtocolError, ValueError) as exc:
                return ch.reject(f"bad request: {exc}")
            lacking = sum(1 for i in wanted if i not in ours)
            if lacking:
                return ch.reject(f"{lacking} selected pieces of {ch.blob_id.short()} "
                                 "are not here", code="not_found")
            return ch.accept(layer, have, decision.result, paused)
        assert ch.layer is not None
        if await self._takes_whole(ch.layer):
            return ch.accept(ch.layer, Bitfield(1), decision.result, paused)
        try:
            partial = await self.store.aio.begin_partial(ch.layer, self._lease)
        except StoreFullError as exc:
            return ch.reject(str(exc), code="unavailable")
        sess.sink = PieceSink(partial)
        if partial.layer.piece_size != ch.layer.piece_size:
            return ch.reject("a partial copy with another piece size is already here",
                             code="unavailable")
        return ch.accept(ch.layer, partial.have, decision.result, paused)

    async def _takes_whole(self, layer: PieceLayer) -> bool:
        """A one-piece blob we hold nothing of is stored whole, skipping the partial blob:
        its piece is its content, and one ``add`` costs far fewer fsyncs than creating,
        writing and flushing a partial blob."""
        return len(layer) == 1 and await self.store.aio.bitfield(layer.blob_id) is None

    async def _session(self, live: _Live, sess: _Session, first: Step) -> None:
        ch = live.ch
        live.session = sess
        try:
            await self._apply(live, first)
            if ch.terminal:  # refused
                return
            async with asyncio.TaskGroup() as tg:
                loops = [tg.create_task(self._recv_loop(live, sess))]
                if ch.is_sender:
                    loops.append(tg.create_task(self._send_loop(live, sess)))
                else:
                    loops.append(tg.create_task(self._write_loop(live, sess)))
                    loops.append(tg.create_task(self._flush_loop(live, sess)))
                await sess.over.wait()
                for t in loops:
                    t.cancel()
        except* TransportError as eg:
            await self._end_broken(live, str(eg.exceptions[0]))
        except* StoreFullError as eg:
            await self._apply(live, ch.fail(str(eg.exceptions[0]), "store_full"))
        except* BlobmeshError as eg:
            await self._apply(live, ch.fail(str(eg.exceptions[0])))
        finally:
            await self._end_session(live, sess)

    async def _end_broken(self, live: _Live, reason: str) -> None:
        live.session = None
        await self._apply(live, live.ch.disconnected(reason))
        self._schedule_restart(live)

    async def _end_session(self, live: _Live, sess: _Session) -> None:
        live.session = None
        try:
            if sess.sink is not None:
                # written pieces become present: a restart will not ask for them again
                await self.store.aio.flush(sess.sink.partial)
                await self.store.aio.io(sess.sink.close)
        except BlobmeshError as exc:
            log.warning("closing partial blob of %s: %s", live.ch.id, exc)
        finally:
            if live.ch.terminal:
                with contextlib.suppress(TransportError):
                    await sess.stream.close()
            else:
                sess.stream.reset("session ended")
            self._save(live)
            sess.ended.set()
            if live.ch.terminal:
                live.finished.set()

    def _schedule_restart(self, live: _Live) -> None:
        ch = live.ch
        if ch.is_initiator and self.config.auto_restart and not ch.terminal:
            c = self.config
            delay = min(c.restart_backoff * 2 ** ch.rec.idle_restarts, c.restart_backoff_max)
            live.next_restart = self.clock() + delay

    async def _recv_loop(self, live: _Live, sess: _Session) -> None:
        ch = live.ch
        while not ch.terminal:
            raw = await sess.stream.recv()
            try:
                step = ch.receive(decode(raw))
            except BadPeerDataError as exc:
                step = ch.fail(str(exc), "bad_data")
            except ProtocolError as exc:
                step = ch.fail(str(exc), "protocol")
            await self._apply(live, step)

    async def _send_loop(self, live: _Live, sess: _Session) -> None:
        """Sender: pieces are read a few ahead of sending, so disk and network overlap."""
        ch = live.ch
        assert ch.layer is not None
        chunk = self.config.chunk
        reader = await self.store.aio.piece_reader(ch.layer, verify=self.config.verify_reads)
        ready: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(READ_AHEAD)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_ahead(live, sess, reader, ready))
                while True:
                    index, data = await ready.get()
                    view = memoryview(data)
                    async with sess.send_lock:
                        for off in range(0, max(len(view), 1), chunk):
                            part = view[off : off + chunk]
                            await sess.stream.send(part, head=data_head(index, off, len(part)))
        finally:
            await self.store.aio.io(reader.close)

    async def _read_ahead(self, live: _Live, sess: _Session, reader: PieceReader,
                          ready: asyncio.Queue[tuple[int, bytes]]) -> None:
        ch = live.ch
        while True:
            # the pieces the window allows, up to READ_AHEAD, read in one trip to a thread
            batch: list[int] = []
            while len(batch) < READ_AHEAD and (i := ch.next_piece(self.config.window)) is not None:
                batch.append(i)
                await self._apply(live, ch.piece_queued(i))
            if not batch:
                sess.wake.clear()
                await sess.wake.wait()
                continue
            try:
                datas = await self.store.aio.io(reader.read_many, batch)
            except (BlobIncompleteError, CorruptBlobError) as exc:
                await self._apply(live, ch.fail(
                    f"cannot read piece {exc.context.get('piece')}: {exc}", "local"))
                return
            for index, data in zip(batch, datas, strict=True):
                await ready.put((index, data))

    async def _write_loop(self, live: _Live, sess: _Session) -> None:
        ch = live.ch
        if sess.sink is None:
            # pull: the partial blob opens once the response brought the layer
            while ch.layer is None or ch.awaiting_response:
                sess.wake.clear()
                await sess.wake.wait()
            assert ch.layer is not None
            if await self._takes_whole(ch.layer):
                await self._write_whole(live, sess, ch.layer)
                return
            partial = await self.store.aio.begin_partial(ch.layer, self._lease)
            sess.sink = PieceSink(partial)
            if partial.layer.piece_size != ch.layer.piece_size:
                await self._apply(live, ch.fail("a partial copy with another piece size is "
                                                "already here"))
                return
        sink = sess.sink
        while True:
            batch = [await sess.writes.get()]
            while not sess.writes.empty():
                batch.append(sess.writes.get_nowait())
            written, bad = await self.store.aio.io(sink.write, batch)
            sess.unflushed += written
            done = set(written)
            sess.unflushed_bytes += sum(len(d) for i, d in batch if i in done)
            if bad is not None:
                sess.flush_now.set()
                await self._apply(live, ch.bad_data(*bad))
                return
            # flush early when nothing else is coming, so the last pieces are acked at once
            if sess.unflushed_bytes >= self.config.flush_bytes or \
                    len(sess.unflushed) >= ch.remaining:
                sess.flush_now.set()

    async def _write_whole(self, live: _Live, sess: _Session, layer: PieceLayer) -> None:
        index, data = await sess.writes.get()
        try:
            await self.store.aio.add_bytes(data, self._lease, expected=layer.blob_id)
        except VerificationError as exc:
            await self._apply(live, live.ch.bad_data(index, str(exc)))
            return
        await self._apply(live, live.ch.pieces_verified([index]))

    async def _flush_loop(self, live: _Live, sess: _Session) -> None:
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives as the event fires, and this loop would then outlive its session
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.flush_interval):
                    await sess.flush_now.wait()
            sess.flush_now.clear()
            if not sess.unflushed or sess.sink is None:
                continue
            batch, sess.unflushed, sess.unflushed_bytes = sess.unflushed, [], 0
            have = await self.store.aio.flush(sess.sink.partial)
            await self._apply(live, live.ch.pieces_verified([i for i in batch if i in have]))

    # --- applying steps ------------------------------------------------------------------

    async def _apply(self, live: _Live, step: Step) -> None:
        """Carry out what a transition asked for: send, publish, persist, write, revalidate."""
        ch = live.ch
        sess = live.session
        if step.send and sess is not None:
            try:
                await sess.send(step.send)
            except TransportError:
                # the session's receive loop sees the broken stream and ends the session
                sess.stream.reset("send failed")
        self._publish(ch, step.events)
        self._save(live)
        if sess is not None:
            for piece in step.pieces:
                await sess.writes.put(piece)
        await self._revalidate(live, step)
        if sess is not None:
            sess.wake.set()
            if ch.terminal:
                sess.over.set()  # the session's end sets ``finished``, after its cleanup
        elif ch.terminal:
            live.finished.set()

    async def _revalidate(self, live: _Live, step: Step) -> None:
        ch = live.ch
        if ch.is_initiator or ch.terminal:
            return
        reval = self._revalidators.get(ch.rec.vouchers[0].type)
        if step.revalidate is not None:
            if reval is None:
                d = Decision.reject("no revalidator for this voucher type")
            else:
                d = reval.revalidate(ch.id, step.revalidate)
            if d.verdict is Verdict.PAUSE and d.result is not None:
                await self._apply(live, ch.demand_voucher(d.result,
                                                          Status(ch.rec.base) is
                                                          Status.FINALIZING))
            else:
                await self._apply(live, ch.voucher_verdict(d.verdict is Verdict.ACCEPT,
                                                           d.result, d.message))
            return
        if reval is not None and step.new_verified:
            d2 = (reval.on_pull_data_sent(ch.id, step.new_verified) if ch.rec.pull
                  else reval.on_push_data_received(ch.id, step.new_verified))
            await self._decide(live, d2, final=False)
        if step.finished:
            d3 = reval.on_complete(ch.id) if reval is not None else None
            if d3 is None or d3.verdict is Verdict.ACCEPT:
                await self._apply(live, ch.complete())
            else:
                await self._decide(live, d3, final=True)

    async def _decide(self, live: _Live, d: Decision | None, final: bool) -> None:
        ch = live.ch
        if d is None or d.verdict is Verdict.ACCEPT:
            return
        if d.verdict is Verdict.REJECT:
            await self._apply(live, ch.fail(f"revalidation failed: {d.message}", "rejected"))
        else:
            await self._apply(live, ch.demand_voucher(d.result or Voucher(""), final))

    def _save(self, live: _Live) -> None:
        """Persist a new or finished channel now; batch other changes into the next tick
        (one transaction), since a lost update is recomputed from the store on restart."""
        status = live.ch.status
        if live.saved_status is None or (status in TERMINAL and status is not live.saved_status):
            self._db.save_many([live.ch.rec])
            live.saved_status = status
            self._dirty.discard(live.ch.id)
        elif status is not live.saved_status or live.ch.rec.updated != live.saved_update:
            self._dirty.add(live.ch.id)

    def _save_dirty(self) -> None:
        lives = [self._live[cid] for cid in self._dirty if cid in self._live]
        self._dirty.clear()
        self._db.save_many([live.ch.rec for live in lives])
        for live in lives:
            live.saved_status, live.saved_update = live.ch.status, live.ch.rec.updated

    async def _prune(self) -> None:
        """Forget channels that finished more than ``retention`` ago; fail responder channels
        their initiator abandoned that long ago (only the initiator restarts a channel)."""
        cutoff = self.clock() - self.config.retention
        for live in list(self._live.values()):
            ch = live.ch
            if (not ch.is_initiator and not ch.terminal and live.session is None
                    and ch.rec.updated < cutoff):
                await self._apply(live, ch.fail("abandoned by the initiator"))
        for cid in [cid for cid, live in self._live.items()
                    if live.ch.terminal and live.session is None
                    and live.ch.rec.updated < cutoff]:
            del self._live[cid]
        self.channels_pruned += self._db.prune(cutoff)

    # --- monitoring ----------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Detect stalls and restart stalled channels we initiated, with backoff."""
        c = self.config
        next_prune = 0.0
        while True:
            await asyncio.sleep(min(c.tick, c.stall_timeout / 4))
            self._save_dirty()
            if self.clock() >= next_prune:
                await self._prune()
                next_prune = self.clock() + min(60.0, c.retention / 10)
            for live in list(self._live.values()):
                ch = live.ch
                if ch.terminal:
                    continue
                step = ch.tick(c.stall_timeout)
                if step.events:
                    await self._apply(live, step)
                    if live.session is not None:
                        live.session.stream.reset("stalled")
                    self._schedule_restart(live)
                runner_idle = live.runner is None or live.runner.done()
                if (ch.status is Status.STALLED and ch.is_initiator and c.auto_restart
                        and runner_idle and live.session is None
                        and self.clock() >= live.next_restart):
                    if ch.rec.idle_restarts >= c.max_idle_restarts:
                        await self._apply(live, ch.fail(
                            f"gave up after {ch.rec.idle_restarts} restarts that moved no "
                            "data"))
                        continue
                    live.runner = self._spawn(self._run_initiator(live))

