"""The sans-I/O channel state machine (both roles), its statuses, events and persisted record.

A :class:`Channel` is fed received messages, local commands and I/O results (a piece was
queued, pieces became durable, the stream broke, time passed) and returns a :class:`Step`:
messages to send, events to publish, pieces to write, and requests for the application
(validate a voucher, run the completion revalidator).  It never touches a socket, a disk or
the clock itself, so every transition is tested deterministically.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from blobmesh.errors import BadPeerDataError, ProtocolError, VerificationError
from blobmesh.hashing import BlobId, Buffer, PieceLayer
from blobmesh.store.bitfield import Bitfield
from blobmesh.transfer.messages import (
    MAX_CHUNK,
    VERSION,
    Ack,
    Cancel,
    Complete,
    Data,
    Error,
    Layer,
    Message,
    Pause,
    Request,
    Response,
    Resume,
    Selector,
    VoucherResult,
    VoucherUpdate,
)
from blobmesh.transport.identity import NodeId

Clock = Callable[[], float]
MAX_STAGE_LOGS = 64


class Status(enum.Enum):
    """Channel statuses: go-data-transfer's, plus ``Stalled``.

    The transient cleanup statuses (Completing, Failing, Cancelling) are not used: cleanup
    here is a synchronous step of the transition, so nothing can observe them.
    """

    REQUESTED = "Requested"
    ONGOING = "Ongoing"
    TRANSFER_FINISHED = "TransferFinished"
    FINALIZING = "Finalizing"
    RESPONDER_FINALIZING_TRANSFER_FINISHED = "ResponderFinalizingTransferFinished"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    INITIATOR_PAUSED = "InitiatorPaused"
    RESPONDER_PAUSED = "ResponderPaused"
    BOTH_PAUSED = "BothPaused"
    STALLED = "Stalled"
    """No progress or no connection; awaiting a restart (automatic on the initiator)."""
    CHANNEL_NOT_FOUND = "ChannelNotFoundError"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class EventCode(enum.Enum):
    OPEN = "Open"
    ACCEPT = "Accept"
    RESTART = "Restart"
    DATA_QUEUED = "DataQueued"
    DATA_SENT = "DataSent"
    DATA_RECEIVED = "DataReceived"
    CANCEL = "Cancel"
    ERROR = "Error"
    NEW_VOUCHER = "NewVoucher"
    NEW_VOUCHER_RESULT = "NewVoucherResult"
    PAUSE_INITIATOR = "PauseInitiator"
    RESUME_INITIATOR = "ResumeInitiator"
    PAUSE_RESPONDER = "PauseResponder"
    RESUME_RESPONDER = "ResumeResponder"
    FINISH_TRANSFER = "FinishTransfer"
    BEGIN_FINALIZING = "BeginFinalizing"
    RESPONDER_BEGINS_FINALIZATION = "ResponderBeginsFinalization"
    DISCONNECTED = "Disconnected"
    STALLED = "Stalled"
    REQUEST_TIMED_OUT = "RequestTimedOut"
    COMPLETE = "Complete"


_QUIET = frozenset({EventCode.DATA_QUEUED, EventCode.DATA_SENT, EventCode.DATA_RECEIVED})
"""Progress events: published, but not written to the per-stage log."""


@dataclass(frozen=True, slots=True, order=True)
class ChannelId:
    """(initiator, responder, transfer id): unique across the fleet."""

    initiator: NodeId
    responder: NodeId
    transfer_id: int

    def other(self, me: NodeId) -> NodeId:
        return self.responder if me == self.initiator else self.initiator

    def __str__(self) -> str:
        return f"{self.initiator.short()}-{self.responder.short()}-{self.transfer_id}"


class Voucher(msgspec.Struct, frozen=True):
    """A typed, opaque authorisation (or a validator's result) sent with a channel."""

    type: str
    data: bytes = b""


class LogLine(msgspec.Struct):
    message: str
    time: float


class Stage(msgspec.Struct):
    """One status the channel went through, with what happened during it."""

    name: str
    created: float
    updated: float
    logs: list[LogLine] = msgspec.field(default_factory=list)


class ChannelRecord(msgspec.Struct):
    """Everything persisted about a channel (the manager stores it in SQLite)."""

    initiator: str
    responder: str
    transfer_id: int
    self_peer: str
    pull: bool
    blob_id: bytes
    selector: Selector
    vouchers: list[Voucher]
    base: str = Status.REQUESTED.value
    message: str = ""
    initiator_paused: bool = False
    responder_paused: bool = False
    awaiting_voucher: bool = False
    voucher_results: list[Voucher] = msgspec.field(default_factory=list)
    layer: Layer | None = None
    done: bytes = b""
    total: int = 0
    """Bytes the selector covers (known once the layer is)."""
    verified: int = 0
    """Bytes of selected pieces verified by the receiver: counted once, across restarts."""
    queued: int = 0
    wire: int = 0
    """Data bytes sent or received on the wire, re-sends included."""
    restarts: int = 0
    attempts: int = 0
    idle_restarts: int = 0
    """Consecutive restarts after which no data moved."""
    verified_at_restart: int = 0
    error_kind: str = ""
    bad_peer: str = ""
    created: float = 0.0
    updated: float = 0.0
    stages: list[Stage] = msgspec.field(default_factory=list)

    @property
    def channel_id(self) -> ChannelId:
        return ChannelId(NodeId.parse(self.initiator), NodeId.parse(self.responder),
                         self.transfer_id)

    @property
    def status(self) -> Status:
        base = Status(self.base)
        if base is not Status.ONGOING:
            return base
        theirs = self.responder_paused or self.awaiting_voucher
        if self.initiator_paused and theirs:
            return Status.BOTH_PAUSED
        if self.initiator_paused:
            return Status.INITIATOR_PAUSED
        if theirs:
            return Status.RESPONDER_PAUSED
        return Status.ONGOING


@dataclass(frozen=True, slots=True)
class ChannelState:
    """An immutable snapshot of a channel, as subscribers and ``channel_state`` see it."""

    channel_id: ChannelId
    status: Status
    self_peer: NodeId
    is_pull: bool
    blob_id: BlobId
    selector: Selector
    total: int
    sent: int
    received: int
    queued: int
    wire_bytes: int
    message: str
    vouchers: tuple[Voucher, ...]
    voucher_results: tuple[Voucher, ...]
    restarts: int
    stages: tuple[Stage, ...]

    @property
    def sender(self) -> NodeId:
        return self.channel_id.responder if self.is_pull else self.channel_id.initiator

    @property
    def recipient(self) -> NodeId:
        return self.channel_id.initiator if self.is_pull else self.channel_id.responder

    @property
    def other_peer(self) -> NodeId:
        return self.channel_id.other(self.self_peer)

    @property
    def last_voucher(self) -> Voucher | None:
        return self.vouchers[-1] if self.vouchers else None

    @property
    def last_voucher_result(self) -> Voucher | None:
        return self.voucher_results[-1] if self.voucher_results else None


@dataclass(frozen=True, slots=True)
class Event:
    code: EventCode
    channel_id: ChannelId
    message: str
    timestamp: float


@dataclass(slots=True)
class Step:
    """What a transition asks the I/O layer to do."""

    send: list[Message] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    pieces: list[tuple[int, Buffer]] = field(default_factory=list)
    """Receiver: complete pieces, unverified, to verify and write."""
    revalidate: Voucher | None = None
    """Responder: a new voucher arrived; run the revalidator."""
    finished: bool = False
    """Responder: all selected data is verified; run the completion revalidator."""
    new_verified: int = 0
    """Bytes newly verified by this step (for the data revalidators)."""


class Channel:
    """One channel's protocol state, from the point of view of one side."""

    def __init__(self, rec: ChannelRecord, clock: Clock) -> None:
        self.rec = rec
        self.clock = clock
        self.id = rec.channel_id
        self.me = NodeId.parse(rec.self_peer)
        self.is_initiator = rec.self_peer == rec.initiator
        self.is_sender = rec.pull != self.is_initiator
        self.blob_id = BlobId(rec.blob_id)
        self.layer: PieceLayer | None = None
        self.wanted: list[int] = []
        self._wanted_set: frozenset[int] = frozenset()
        self.done = Bitfield(0)
        self.pending: deque[int] = deque()
        self.in_flight: dict[int, int] = {}
        """Sender: pieces queued but not acknowledged, with their lengths."""
        self.in_flight_bytes = 0
        self.remaining = 0
        """Selected pieces not verified yet."""
        self._partial: dict[int, bytearray] = {}
        self._awaiting_response = False
        self._requested_have: Bitfield | None = None
        self._finished_reported = False
        self.last_progress = clock()
        self._step = Step()
        if rec.layer is not None:
            # a persisted layer was verified when it was first received
            self._set_layer(PieceLayer.from_bytes(self.blob_id, rec.layer.size,
                                                  rec.layer.piece_size, rec.layer.hashes))
            if rec.done:
                self.done = Bitfield(len(self.layer or ()), rec.done)
                self.remaining = sum(1 for i in self.wanted if i not in self.done)

    # --- construction --------------------------------------------------------------------

    @classmethod
    def initiate(cls, chid: ChannelId, pull: bool, blob_id: BlobId, selector: Selector,
                 voucher: Voucher, clock: Clock, layer: PieceLayer | None = None) -> Channel:
        """A new channel on the initiator's side (``layer``: ours, when we hold the blob)."""
        now = clock()
        rec = ChannelRecord(str(chid.initiator), str(chid.responder), chid.transfer_id,
                            str(chid.initiator), pull, blob_id.digest, selector, [voucher],
                            created=now, updated=now)
        ch = cls(rec, clock)
        if layer is not None:
            ch._set_layer(layer)
        return ch

    @classmethod
    def respond(cls, req: Request, initiator: NodeId, responder: NodeId,
                clock: Clock) -> Channel:
        """A new channel on the responder's side, from the initiator's request.

        Raises ProtocolError for a malformed request and BadPeerDataError when a pushed piece
        layer does not match the blob id.
        """
        if req.version != VERSION:
            raise ProtocolError(f"transfer protocol version {req.version} is not supported")
        if len(req.blob_id) != 32:
            raise ProtocolError("request names a malformed blob id")
        now = clock()
        rec = ChannelRecord(str(initiator), str(responder), req.transfer_id, str(responder),
                            req.pull, req.blob_id, req.selector,
                            [Voucher(req.voucher_type, req.voucher)], created=now, updated=now)
        ch = cls(rec, clock)
        ch._stage_log(Status.REQUESTED, "request received")
        if not req.pull:
            if req.layer is None:
                raise ProtocolError("push request without a piece layer")
            ch._set_layer(ch._verify_layer(req.layer))
        ch.rec.initiator_paused = req.paused
        return ch

    # --- queries -------------------------------------------------------------------------

    @property
    def status(self) -> Status:
        return self.rec.status

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def moving(self) -> bool:
        """Data may flow now: accepted, not paused, not waiting on a voucher."""
        r = self.rec
        return (Status(r.base) is Status.ONGOING and not r.initiator_paused
                and not r.responder_paused and not r.awaiting_voucher)

    def snapshot(self) -> ChannelState:
        r = self.rec
        return ChannelState(
            self.id, r.status, self.me, r.pull, self.blob_id, r.selector, r.total,
            r.verified if self.is_sender else 0, 0 if self.is_sender else r.verified,
            r.queued, r.wire, r.message, tuple(r.vouchers), tuple(r.voucher_results),
            r.restarts, tuple(msgspec.structs.replace(s, logs=list(s.logs)) for s in r.stages))

    def missing(self) -> list[int]:
        return [i for i in self.wanted if i not in self.done]

    # --- initiator -----------------------------------------------------------------------

    def request(self, have: Bitfield | None = None) -> Step:
        """The opening request (or, on a stalled/paused channel, the restart request).

        ``have`` is the receiver's verified-piece bitfield when it holds part of the blob.
        """
        self._require(self.is_initiator, "only the initiator requests")
        r = self.rec
        # the first request opens the first stage, so a channel with stages was requested
        restart = bool(r.stages)
        if restart:
            if self.terminal:
                raise ProtocolError(f"cannot restart a {self.status.value} channel")
            r.restarts += 1
            self._clear_in_flight()
            self._partial.clear()
        if have is not None and not self.is_sender:
            if self.layer is None:
                self._requested_have = have  # merged once the response brings the layer
            else:
                self._merge_done(have, replace=True)
        v = r.vouchers[-1]
        self._awaiting_response = True
        self._send(Request(
            r.transfer_id, r.pull, r.blob_id, v.type, v.data, r.selector, restart=restart,
            paused=r.initiator_paused,
            layer=r.layer if self.is_sender else None,
            have=have.to_bytes() if have is not None and not self.is_sender else None))
        self.last_progress = self.clock()
        if restart:
            self._event(EventCode.RESTART, f"restart #{r.restarts}")
        else:
            self._to(Status.REQUESTED)
            self._event(EventCode.OPEN, f"{'pull' if r.pull else 'push'} requested")
        return self._take()

    def note_restart_attempt(self) -> None:
        """Count a connection attempt; consecutive ones after which no data moved are
        tracked in ``idle_restarts`` (the manager caps them)."""
        r = self.rec
        r.idle_restarts = r.idle_restarts + 1 if (r.attempts and
                                                  r.verified == r.verified_at_restart) else 0
        r.verified_at_restart = r.verified
        r.attempts += 1

    @property
    def awaiting_response(self) -> bool:
        return self._awaiting_response

    def send_voucher(self, voucher: Voucher) -> Step:
        self._require(self.is_initiator, "only the initiator sends vouchers")
        if not self.terminal:
            self.rec.vouchers.append(voucher)
            self._send(VoucherUpdate(voucher.type, voucher.data))
            self._event(EventCode.NEW_VOUCHER, f"voucher of type {voucher.type}")
        return self._take()

    # --- responder -----------------------------------------------------------------------

    def restarted(self, req: Request) -> None:
        """The initiator restarts this (persisted) channel with ``req``."""
        if req.pull != self.rec.pull or req.blob_id != self.rec.blob_id:
            raise ProtocolError("restart request does not match the channel")
        # a channel we completed may be restarted: the initiator missed our ``complete``
        # (it crashed first), and completes again once the bitfields agree
        if Status(self.rec.base) in (Status.FAILED, Status.CANCELLED):
            raise ProtocolError(f"cannot restart a {self.status.value} channel")
        self.rec.initiator_paused = req.paused
        self.rec.restarts += 1
        self._clear_in_flight()
        self._partial.clear()
        self._finished_reported = False
        self._to(Status.REQUESTED)
        self._event(EventCode.RESTART, "initiator restarts the channel")

    def accept(self, layer: PieceLayer, have: Bitfield | None, result: Voucher | None = None,
               paused: bool = False) -> Step:
        """Responder: the validator accepted (``paused``: accepted, but wants a new voucher
        first).  ``layer`` is the blob's; ``have`` the receiver's verified pieces."""
        self._require(not self.is_initiator, "only the responder accepts")
        r = self.rec
        if self.layer is None:
            self._set_layer(layer)
        if have is not None:
            self._merge_done(have, replace=self.is_sender)
        if result is not None:
            r.voucher_results.append(result)
        r.awaiting_voucher = paused
        self._to(Status.ONGOING)
        rt, rd = (result.type, result.data) if result else ("", b"")
        self._send(Response(True, r.responder_paused, rt, rd,
                            layer=r.layer if self.is_sender else None,
                            have=self.done.to_bytes() if not self.is_sender else None))
        if paused:
            self._send(VoucherResult(True, True, False))
        self._event(EventCode.ACCEPT, "request accepted" + (", awaiting a voucher" * paused))
        self._reset_pending()
        self._check_finished()
        return self._take()

    def reject(self, message: str, result: Voucher | None = None,
               code: str = "rejected") -> Step:
        """Responder: refuse the request (``code`` as in :class:`Response`)."""
        self._require(not self.is_initiator, "only the responder rejects")
        if result is not None:
            self.rec.voucher_results.append(result)
        self._send(Response(False, False, result.type if result else "",
                            result.data if result else b"", message, code=code))
        self._fail(f"refused: {message}", code)
        return self._take()

    def demand_voucher(self, result: Voucher, final: bool = False) -> Step:
        """Responder: a revalidator wants a new voucher before more data moves (``final``:
        before completing)."""
        self._require(not self.is_initiator, "only the responder demands vouchers")
        if self.terminal:
            return self._take()
        r = self.rec
        r.voucher_results.append(result)
        r.awaiting_voucher = True
        self._send(VoucherResult(True, True, final, result.type, result.data))
        if final:
            self._to(Status.FINALIZING)
            self._event(EventCode.BEGIN_FINALIZING, "awaiting the final voucher")
        else:
            self._event(EventCode.PAUSE_RESPONDER, "awaiting a new voucher")
        return self._take()

    def voucher_verdict(self, accepted: bool, result: Voucher | None = None,
                        message: str = "") -> Step:
        """Responder: the revalidator's verdict on the last voucher update."""
        r = self.rec
        if self.terminal:
            return self._take()
        if result is not None:
            r.voucher_results.append(result)
        rt, rd = (result.type, result.data) if result else ("", b"")
        if not accepted:
            self._send(VoucherResult(False, False, False, rt, rd, message))
            self._fail(f"voucher rejected: {message}", "rejected")
            return self._take()
        was_waiting, r.awaiting_voucher = r.awaiting_voucher, False
        if Status(r.base) is Status.FINALIZING:
            self._send(VoucherResult(True, False, True, rt, rd))
            return self.complete()
        self._send(VoucherResult(True, False, False, rt, rd))
        if was_waiting:
            self._event(EventCode.RESUME_RESPONDER, "new voucher accepted")
        return self._take()

    def complete(self) -> Step:
        """Responder: the channel is done (after the completion revalidator agreed)."""
        if not self.terminal:
            self._send(Complete())
            self._to(Status.COMPLETED)
            self._event(EventCode.COMPLETE, "completed")
        return self._take()

    # --- data path -----------------------------------------------------------------------

    def next_piece(self, window: int) -> int | None:
        """Sender: the next piece to queue, or None while paused or ``window`` bytes are
        unacknowledged."""
        if not self.moving or self.layer is None:
            return None
        if self.in_flight_bytes >= window:
            return None
        while self.pending:
            i = self.pending.popleft()
            if i not in self.done and i not in self.in_flight:
                return i
        return None

    def piece_queued(self, index: int) -> Step:
        """Sender: piece ``index`` was read and is being sent."""
        assert self.layer is not None
        _, length = self.layer.piece_range(index)
        self.in_flight[index] = length
        self.in_flight_bytes += length
        self.rec.queued += length
        self.rec.wire += length
        self._event(EventCode.DATA_QUEUED, f"piece {index}")
        return self._take()

    def pieces_verified(self, indices: list[int]) -> Step:
        """Receiver: these pieces are verified and durable in the store."""
        if self.terminal:
            return self._take()
        pieces, fresh = self._add_done(indices)
        if pieces:
            self._send(Ack(sorted(indices)))
            self._step.new_verified = fresh
            self._event(EventCode.DATA_RECEIVED, f"{self.rec.verified}/{self.rec.total} bytes")
            self._check_finished()
        return self._take()

    def bad_data(self, index: int, detail: str) -> Step:
        """Receiver: the peer's piece ``index`` failed verification."""
        peer = self.id.other(self.me)
        self.rec.bad_peer = str(peer)
        self._send(Error(f"piece {index} failed verification", bad_data=True))
        self._fail(f"{peer.short()} sent bad data: {detail}", "bad_data")
        return self._take()

    # --- local commands ------------------------------------------------------------------

    def pause(self) -> Step:
        if not self.terminal and not self._my_pause:
            self._set_my_pause(True)
            self._send(Pause())
            self._event(self._my_pause_code(True), "paused locally")
        return self._take()

    def resume(self) -> Step:
        if not self.terminal and self._my_pause:
            self._set_my_pause(False)
            self._send(Resume())
            self._event(self._my_pause_code(False), "resumed locally")
        return self._take()

    def cancel(self, reason: str = "cancelled") -> Step:
        """Cancel; always allowed (a dead or already-cancelled channel just stays so)."""
        if not self.terminal:
            self._send(Cancel(reason))
            self._to(Status.CANCELLED, reason)
            self._event(EventCode.CANCEL, reason)
        return self._take()

    def fail(self, message: str, kind: str = "transfer") -> Step:
        """A local error ends the channel (the peer is told)."""
        if not self.terminal:
            self._send(Error(message))
            self._fail(message, kind)
        return self._take()

    def disconnected(self, reason: str) -> Step:
        """The stream broke: the channel is stalled until a restart."""
        self._awaiting_response = False
        self._partial.clear()
        if not self.terminal:
            self._to(Status.STALLED, f"disconnected: {reason}")
            self._event(EventCode.DISCONNECTED, reason)
        return self._take()

    def tick(self, stall_timeout: float) -> Step:
        """Time passed: a channel that should move but has not for ``stall_timeout`` stalls."""
        base = Status(self.rec.base)
        idle = self.clock() - self.last_progress
        if idle >= stall_timeout and (self.moving or base is Status.REQUESTED):
            code = EventCode.REQUEST_TIMED_OUT if base is Status.REQUESTED else \
                EventCode.STALLED
            self._to(Status.STALLED, f"no progress for {idle:.1f}s")
            self._event(code, f"no progress for {idle:.1f}s")
        return self._take()

    # --- received messages ---------------------------------------------------------------

    def receive(self, msg: Message) -> Step:
        """Handle one message from the peer; ProtocolError when it breaks the protocol.

        Anything arriving on a finished channel is dropped, so both sides cancelling (or
        failing) at once is harmless.
        """
        if self.terminal:
            return self._take()
        match msg:
            case Data():
                self._on_data(msg)
            case Ack():
                self._on_ack(msg)
            case Response():
                self._on_response(msg)
            case Pause() | Resume():
                self._on_pause(isinstance(msg, Pause))
            case VoucherUpdate():
                self._require(not self.is_initiator, "voucher update sent to the initiator")
                v = Voucher(msg.voucher_type, msg.voucher)
                self.rec.vouchers.append(v)
                self._event(EventCode.NEW_VOUCHER, f"voucher of type {v.type}")
                self._step.revalidate = v
            case VoucherResult():
                self._on_voucher_result(msg)
            case Complete():
                self._require(self.is_initiator and self.layer is not None
                              and not self._awaiting_response, "unexpected complete")
                if self.remaining:
                    raise ProtocolError("peer completed before all data moved")
                self._to(Status.COMPLETED)
                self._event(EventCode.COMPLETE, "completed")
            case Cancel():
                self._to(Status.CANCELLED, f"cancelled by peer: {msg.reason}")
                self._event(EventCode.CANCEL, f"cancelled by peer: {msg.reason}")
            case Error():
                self._fail(f"peer failed: {msg.message}", "peer")
            case Request():
                raise ProtocolError("second request on one channel")
        return self._take()

    def _on_response(self, msg: Response) -> None:
        self._require(self.is_initiator and self._awaiting_response, "unexpected response")
        self._awaiting_response = False
        r = self.rec
        if msg.result_type:
            r.voucher_results.append(Voucher(msg.result_type, msg.result))
            self._event(EventCode.NEW_VOUCHER_RESULT, f"result of type {msg.result_type}")
        if not msg.accepted:
            self._fail(f"refused by {self.id.responder.short()}: {msg.message or 'no reason'}",
                       msg.code if msg.code in ("not_found", "unavailable") else "rejected")
            return
        if self.layer is None:
            if msg.layer is None:
                raise ProtocolError("pull accepted without a piece layer")
            self._set_layer(self._verify_layer(msg.layer))
            have, self._requested_have = self._requested_have, None
            if have is not None and self.layer is not None and have.size == len(self.layer):
                self._merge_done(have, replace=True)
        elif msg.layer is not None and msg.layer != r.layer:
            raise ProtocolError("the responder's piece layer differs from ours "
                                "(another piece size)")
        if msg.have is not None:
            self._merge_done(self._bitfield(msg.have), replace=True)
        r.responder_paused = msg.paused
        r.awaiting_voucher = False
        self._to(Status.ONGOING)
        self._event(EventCode.ACCEPT, "accepted" + (", responder paused" * msg.paused))
        self._reset_pending()
        self._check_finished()

    def _on_data(self, msg: Data) -> None:
        self._require(not self.is_sender and self.layer is not None, "unexpected data")
        assert self.layer is not None
        base = Status(self.rec.base)
        self._require(base in (Status.ONGOING, Status.FINALIZING,
                               Status.RESPONDER_FINALIZING_TRANSFER_FINISHED,
                               Status.TRANSFER_FINISHED, Status.STALLED),
                      f"data in status {base.value}")
        i = msg.piece
        if not 0 <= i < len(self.layer):
            raise ProtocolError(f"data for piece {i}, which does not exist")
        _, length = self.layer.piece_range(i)
        chunk = len(msg.data)
        if msg.offset + chunk > length or chunk > MAX_CHUNK or (chunk == 0 and length):
            raise ProtocolError(f"data for piece {i} at {msg.offset}+{chunk} is out of range")
        self.rec.wire += chunk
        self.last_progress = self.clock()
        if msg.offset == 0 and chunk == length:
            self._step.pieces.append((i, msg.data))
            return
        buf = self._partial.get(i)
        if buf is None:
            if msg.offset:
                raise ProtocolError(f"piece {i} does not start at offset 0")
            buf = self._partial[i] = bytearray()
        elif len(buf) != msg.offset:
            raise ProtocolError(f"piece {i}: chunk at {msg.offset}, expected {len(buf)}")
        buf += msg.data
        if len(buf) == length:
            del self._partial[i]
            self._step.pieces.append((i, buf))

    def _on_ack(self, msg: Ack) -> None:
        self._require(self.is_sender and self.layer is not None, "unexpected ack")
        assert self.layer is not None
        for i in msg.pieces:
            if not 0 <= i < len(self.layer):
                raise ProtocolError(f"ack for piece {i}, which does not exist")
            self.in_flight_bytes -= self.in_flight.pop(i, 0)
        pieces, fresh = self._add_done(msg.pieces)
        if pieces:
            self._step.new_verified = fresh
            self._event(EventCode.DATA_SENT, f"{self.rec.verified}/{self.rec.total} bytes")
            self._check_finished()

    def _on_pause(self, pause: bool) -> None:
        r = self.rec
        theirs = r.responder_paused if self.is_initiator else r.initiator_paused
        if theirs == pause:
            return
        if self.is_initiator:
            r.responder_paused = pause
            code = EventCode.PAUSE_RESPONDER if pause else EventCode.RESUME_RESPONDER
        else:
            r.initiator_paused = pause
            code = EventCode.PAUSE_INITIATOR if pause else EventCode.RESUME_INITIATOR
        self.last_progress = self.clock()
        self._event(code, "paused by peer" if pause else "resumed by peer")

    def _on_voucher_result(self, msg: VoucherResult) -> None:
        self._require(self.is_initiator, "voucher result sent to the responder")
        r = self.rec
        if msg.result_type:
            r.voucher_results.append(Voucher(msg.result_type, msg.result))
        self._event(EventCode.NEW_VOUCHER_RESULT,
                    msg.message or ("new voucher required" if msg.paused else "voucher ok"))
        if not msg.accepted:
            self._fail(f"voucher rejected: {msg.message or 'no reason'}", "rejected")
        elif msg.paused and msg.final:
            self._to(Status.RESPONDER_FINALIZING_TRANSFER_FINISHED)
            self._event(EventCode.RESPONDER_BEGINS_FINALIZATION, "final voucher required")
        elif msg.paused:
            r.awaiting_voucher = True
            self._event(EventCode.PAUSE_RESPONDER, "responder awaits a new voucher")
        elif r.awaiting_voucher:
            r.awaiting_voucher = False
            self.last_progress = self.clock()
            self._event(EventCode.RESUME_RESPONDER, "voucher accepted")

    # --- helpers -------------------------------------------------------------------------

    @property
    def _my_pause(self) -> bool:
        return self.rec.initiator_paused if self.is_initiator else self.rec.responder_paused

    def _set_my_pause(self, value: bool) -> None:
        if self.is_initiator:
            self.rec.initiator_paused = value
        else:
            self.rec.responder_paused = value
        self.last_progress = self.clock()

    def _my_pause_code(self, pause: bool) -> EventCode:
        if self.is_initiator:
            return EventCode.PAUSE_INITIATOR if pause else EventCode.RESUME_INITIATOR
        return EventCode.PAUSE_RESPONDER if pause else EventCode.RESUME_RESPONDER

    def _verify_layer(self, layer: Layer) -> PieceLayer:
        try:
            return layer.verify(self.blob_id)
        except (VerificationError, ValueError) as exc:
            peer = self.id.other(self.me)
            self.rec.bad_peer = str(peer)
            raise BadPeerDataError(f"{peer.short()} sent a bad piece layer: {exc}",
                                   peer=peer, blob_id=self.blob_id) from exc

    def _set_layer(self, layer: PieceLayer) -> None:
        self.layer = layer
        self.rec.layer = Layer.of(layer)
        self.wanted = self.rec.selector.resolve(layer.size, layer.piece_size)
        self._wanted_set = frozenset(self.wanted)
        self.rec.total = sum(layer.piece_range(i)[1] for i in self.wanted)
        self.done = Bitfield(len(layer))
        self.remaining = len(self.wanted)

    def _bitfield(self, raw: bytes) -> Bitfield:
        assert self.layer is not None
        try:
            return Bitfield(len(self.layer), raw)
        except ValueError as exc:
            raise ProtocolError(f"malformed bitfield: {exc}") from exc

    def _merge_done(self, have: Bitfield, replace: bool = False) -> None:
        """Take the receiver's bitfield as the truth about which pieces are verified."""
        if replace:
            self.done = Bitfield(self.done.size)
            self.rec.verified = 0
            self.remaining = len(self.wanted)
        self._add_done(list(have))

    def _add_done(self, indices: list[int]) -> tuple[int, int]:
        """Mark ``indices`` verified; returns (pieces, bytes) newly done. Pieces, not bytes,
        say whether anything changed: the empty blob's one piece has no bytes."""
        assert self.layer is not None
        pieces = fresh = 0
        wanted = self._wanted_set
        for i in indices:
            if i not in self.done and i in wanted:
                self.done.add(i)
                self.remaining -= 1
                pieces += 1
                fresh += self.layer.piece_range(i)[1]
        if pieces:
            self.rec.verified += fresh
            self.rec.done = self.done.to_bytes()
            self.last_progress = self.clock()
        return pieces, fresh

    def _clear_in_flight(self) -> None:
        self.in_flight.clear()
        self.in_flight_bytes = 0

    def _reset_pending(self) -> None:
        self.pending = deque(self.missing()) if self.is_sender else deque()

    def _check_finished(self) -> None:
        if self.remaining or self._finished_reported or self.layer is None:
            return
        self._finished_reported = True
        if self.is_initiator:
            self._to(Status.TRANSFER_FINISHED)
            self._event(EventCode.FINISH_TRANSFER, "all data moved, awaiting the responder")
        else:
            self._step.finished = True

    def _require(self, cond: bool, what: str) -> None:
        if not cond:
            raise ProtocolError(f"protocol violation on channel {self.id}: {what}")

    def _fail(self, message: str, kind: str) -> None:
        self.rec.error_kind = kind
        self._to(Status.FAILED, message)
        self._event(EventCode.ERROR, message)

    def _to(self, status: Status, message: str = "") -> None:
        r = self.rec
        r.message = message
        if r.base != status.value:
            r.base = status.value
            self._stage_log(status, message or "entered")

    def _stage_log(self, status: Status, line: str) -> None:
        now = self.clock()
        stages = self.rec.stages
        if not stages or stages[-1].name != status.value:
            stages.append(Stage(status.value, now, now))
        stage = stages[-1]
        stage.updated = now
        if len(stage.logs) < MAX_STAGE_LOGS:
            stage.logs.append(LogLine(line, now))

    def _send(self, msg: Message) -> None:
        self._step.send.append(msg)

    def _event(self, code: EventCode, message: str) -> None:
        now = self.clock()
        self.rec.updated = now
        self._step.events.append(Event(code, self.id, message, now))
        if code not in _QUIET:
            self._stage_log(self.rec.status if Status(self.rec.base) is Status.ONGOING
                            else Status(self.rec.base), f"{code.value}: {message}")

    def _take(self) -> Step:
        step, self._step = self._step, Step()
        return step
