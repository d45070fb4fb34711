"""The connection state machine: many flow-controlled streams over one byte stream.

Sans-I/O in the style of h2/aioquic: feed it received bytes (:meth:`Connection.feed`) or
already-decoded frames (:meth:`Connection.receive_frames`) and get :class:`Event` objects
back; call ``send_*``/``open_stream``/... to act, then write out :meth:`data_to_send`.  It
never blocks, sleeps or reads a clock; keepalive timing is the I/O layer's job.

Flow control is per stream and counts payload bytes.  A receiver grants ``stream_window``
bytes at open and returns credit as the application consumes whole messages, so a stream
whose reader is slow stops its own sender and no other.  Because a message is delivered only
when complete, it may not exceed ``max_message_size``, which is at most the window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from blobmesh.errors import ProtocolError, TransportError
from blobmesh.wire.frames import (
    DATA_OVERHEAD,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_REASON,
    MIN_FRAME_SIZE,
    Close,
    Credit,
    Data,
    Frame,
    FrameDecoder,
    GoAway,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    encode_frame,
    frame_header,
)

Buffer = bytes | memoryview
_MAX_CREDIT = 1 << 40  # a peer granting more than this is broken or hostile


class Role(enum.Enum):
    """Which side dialed; dialers open odd stream ids, listeners even ones."""

    DIALER = 1
    LISTENER = 2


@dataclass(frozen=True, slots=True)
class Settings:
    """The limits a side enforces on what it receives (announced in its Hello)."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    stream_window: int = 8 * 1024 * 1024
    max_message_size: int = 8 * 1024 * 1024
    max_streams: int = 1024

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.max_frame_size <= 0xFFFF_FFFF:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, 2**32)")
        if not 1 <= self.max_message_size <= self.stream_window <= 0xFFFF_FFFF:
            raise ValueError("need 1 <= max_message_size <= stream_window < 2**32")
        if not 1 <= self.max_streams <= 0xFFFF_FFFF:
            raise ValueError("max_streams must be positive")

    def hello(self) -> Hello:
        return Hello(self.max_frame_size, self.stream_window, self.max_message_size,
                     self.max_streams)

    @classmethod
    def from_hello(cls, hello: Hello) -> Settings:
        try:
            return cls(hello.max_frame_size, hello.stream_window, hello.max_message_size,
                       hello.max_streams)
        except ValueError as exc:
            raise ProtocolError(f"peer announced unusable limits: {exc}") from exc


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer's limits are known; streams may be opened from now on."""

    settings: Settings


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream."""

    stream_id: int
    protocol: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete message; call :meth:`Connection.consumed` once the application took it."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer closed its sending side: no more messages on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class CreditAvailable:
    """The stream's send window grew."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    nonce: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer accepts no new streams."""

    reason: str


Event = (HelloReceived | StreamOpened | MessageReceived | StreamEnded | StreamReset
         | CreditAvailable | PongReceived | GoAwayReceived)


@dataclass(slots=True)
class _Stream:
    send_open: bool = True
    recv_open: bool = True
    send_credit: int = 0
    recv_credit: int = 0  # bytes the peer may still send
    unreleased: int = 0  # consumed bytes not yet returned as credit
    parts: list[bytes] = field(default_factory=list)
    partial: int = 0  # bytes of the message being reassembled


class Connection:
    """One side of a blobmesh connection (see the module docstring)."""

    def __init__(self, role: Role, settings: Settings | None = None) -> None:
        self.role = role
        self.local = settings or Settings()
        self.peer: Settings | None = None
        self._decoder = FrameDecoder(self.local.max_frame_size)
        self._out: list[Buffer] = []
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if role is Role.DIALER else 2
        self._peer_last_id = 0  # highest id the peer opened
        self.goaway_sent = False
        self.goaway_received = False
        self._out.append(encode_frame(self.local.hello()))

    # --- input -------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process received bytes; raises :class:`ProtocolError` on anything invalid.

        After a ProtocolError the connection is dead (events of earlier frames in the same
        call are lost; use :meth:`receive_frame` to keep them).
        """
        events: list[Event] = []
        for frame in self._decoder.feed(data):
            events += self.receive_frame(frame)
        return events

    def receive_frame(self, frame: Frame) -> list[Event]:
        """Process one frame decoded elsewhere (e.g. by a reader thread's FrameDecoder)."""
        events: list[Event] = []
        msg = frame.message
        if self.peer is None:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected Hello, got {type(msg).__name__}")
            self.peer = Settings.from_hello(msg)
            return [HelloReceived(self.peer)]
        match msg:
            case Data():
                self._on_data(msg, frame.payload, events)
            case Credit():
                s = self._known(msg.stream_id)
                if s is not None and s.send_open:
                    s.send_credit += msg.amount
                    if s.send_credit > _MAX_CREDIT:
                        raise ProtocolError("peer granted an absurd send window")
                    events.append(CreditAvailable(msg.stream_id))
            case Open():
                self._on_open(msg, events)
            case Close():
                self._on_close(msg, events)
            case Reset():
                if self._known(msg.stream_id) is not None:
                    del self._streams[msg.stream_id]
                    events.append(StreamReset(msg.stream_id, msg.reason))
            case Ping():
                self._out.append(encode_frame(Pong(msg.nonce)))
            case Pong():
                events.append(PongReceived(msg.nonce))
            case GoAway():
                self.goaway_received = True
                events.append(GoAwayReceived(msg.reason))
            case Hello():
                raise ProtocolError("second Hello")
        return events

    def _known(self, stream_id: int) -> _Stream | None:
        """The stream, or None if it existed once (frames racing a reset are dropped)."""
        s = self._streams.get(stream_id)
        if s is not None:
            return s
        ours = (stream_id % 2 == 1) == (self.role is Role.DIALER)
        if stream_id >= (self._next_id if ours else self._peer_last_id + 1):
            raise ProtocolError(f"frame for stream {stream_id}, which was never opened")
        return None

    def _on_open(self, msg: Open, events: list[Event]) -> None:
        peer_parity = 0 if self.role is Role.DIALER else 1
        if msg.stream_id % 2 != peer_parity or msg.stream_id <= self._peer_last_id:
            raise ProtocolError(f"peer opened invalid stream id {msg.stream_id}")
        self._peer_last_id = msg.stream_id
        # after our GoAway a racing Open is still served: GoAway only asks the peer to stop
        if sum(1 for sid in self._streams if sid % 2 == peer_parity) >= self.local.max_streams:
            self._out.append(encode_frame(Reset(msg.stream_id, "too many streams")))
            return
        assert self.peer is not None
        self._streams[msg.stream_id] = _Stream(send_credit=self.peer.stream_window,
                                               recv_credit=self.local.stream_window)
        events.append(StreamOpened(msg.stream_id, msg.protocol))

    def _on_close(self, msg: Close, events: list[Event]) -> None:
        s = self._known(msg.stream_id)
        if s is None:
            return
        if not s.recv_open:
            raise ProtocolError(f"stream {msg.stream_id} closed twice")
        if s.partial:
            raise ProtocolError(f"stream {msg.stream_id} closed mid-message")
        s.recv_open = False
        self._drop_if_done(msg.stream_id, s)
        events.append(StreamEnded(msg.stream_id))

    def _on_data(self, msg: Data, payload: bytes, events: list[Event]) -> None:
        s = self._known(msg.stream_id)
        if s is None:
            return
        if not s.recv_open:
            raise ProtocolError(f"data on stream {msg.stream_id} after the peer closed it")
        n = len(payload)
        if n > s.recv_credit:
            raise ProtocolError(f"stream {msg.stream_id}: {n} bytes exceed the window")
        s.recv_credit -= n
        if s.partial + n > self.local.max_message_size:
            raise ProtocolError(f"stream {msg.stream_id}: message exceeds "
                                f"{self.local.max_message_size} bytes")
        if msg.more:
            s.parts.append(payload)
            s.partial += n
            return
        if s.parts:
            s.parts.append(payload)
            payload = b"".join(s.parts)
            s.parts.clear()
            s.partial = 0
        events.append(MessageReceived(msg.stream_id, payload))

    # --- output ------------------------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """Buffers to write, in order (payloads are the caller's own buffers, uncopied)."""
        out, self._out = self._out, []
        return out

    def open_stream(self, protocol: str) -> int:
        """Open a stream; returns its id.  Needs the peer's Hello first."""
        if self.peer is None:
            raise TransportError("cannot open a stream before the peer's Hello")
        if self.goaway_sent or self.goaway_received:
            raise TransportError("connection is going away")
        ours = self._next_id % 2
        if sum(1 for sid in self._streams if sid % 2 == ours) >= self.peer.max_streams:
            raise TransportError(f"peer allows at most {self.peer.max_streams} streams")
        stream_id = self._next_id
        self._next_id += 2
        self._out.append(encode_frame(Open(stream_id, protocol)))
        self._streams[stream_id] = _Stream(send_credit=self.peer.stream_window,
                                           recv_credit=self.local.stream_window)
        return stream_id

    def send_budget(self, stream_id: int) -> int:
        """How many payload bytes :meth:`send_data` accepts now (window and frame size)."""
        s = self._sendable(stream_id)
        assert self.peer is not None
        return min(s.send_credit, self.peer.max_frame_size - DATA_OVERHEAD)

    def send_data(self, stream_id: int, data: Buffer, *, more: bool = False) -> None:
        """Send a message fragment (``more`` = further fragments follow) within the budget."""
        if len(data) > self.send_budget(stream_id):
            raise ValueError(f"{len(data)} bytes exceed the send budget of stream {stream_id}")
        self._streams[stream_id].send_credit -= len(data)
        self._out.append(frame_header(Data(stream_id, more), len(data)))
        if data:
            self._out.append(data)

    def close_stream(self, stream_id: int) -> None:
        """Half-close: send nothing more on the stream."""
        s = self._sendable(stream_id)
        s.send_open = False
        self._out.append(encode_frame(Close(stream_id)))
        self._drop_if_done(stream_id, s)

    def reset_stream(self, stream_id: int, reason: str = "") -> None:
        """Abort the stream both ways (no-op if it is already gone)."""
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(encode_frame(Reset(stream_id, reason[:MAX_REASON])))

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took ``n`` bytes of messages; return credit in batches."""
        s = self._streams.get(stream_id)
        if s is None or not s.recv_open:
            return
        s.unreleased += n
        if s.unreleased >= max(1, self.local.stream_window // 4):
            s.recv_credit += s.unreleased
            self._out.append(encode_frame(Credit(stream_id, s.unreleased)))
            s.unreleased = 0

    def send_ping(self, nonce: int) -> None:
        self._out.append(encode_frame(Ping(nonce)))

    def send_goaway(self, reason: str = "") -> None:
        """Refuse new streams from now on (open ones continue)."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out.append(encode_frame(GoAway(reason[:MAX_REASON])))

    def stream_count(self) -> int:
        return len(self._streams)

    def _sendable(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise TransportError(f"stream {stream_id} is reset or unknown")
        if not s.send_open:
            raise TransportError(f"stream {stream_id} is closed for sending")
        if self.peer is None:
            raise TransportError("no Hello from the peer yet")
        return s

    def _drop_if_done(self, stream_id: int, s: _Stream) -> None:
        if not s.send_open and not s.recv_open:
            del self._streams[stream_id]

