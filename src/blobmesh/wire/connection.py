"""The connection state machine: many flow-controlled streams over one byte stream.

Sans-I/O in the style of h2/aioquic: feed it received bytes (:meth:`Connection.feed`) or
frames from its own :attr:`Connection.decoder` (:meth:`Connection.receive_frames`) and get
:class:`Event` objects back; call ``send_*``/``open_stream``/... to act, then write out
:meth:`data_to_send` (control frames first, see :meth:`data_to_send_by_priority`).  It never
blocks, sleeps or reads a clock: with :class:`Timers`, callers pass ``now`` and run
:meth:`handle_timer` at :meth:`get_timer` for keepalive, idle, Hello and admission deadlines.

Flow control counts payload bytes, per stream and per connection.  A receiver grants
``stream_window`` bytes per stream and ``connection_window`` for all streams together, and
returns credit as the application consumes whole messages, so a stream whose reader is slow
stops its own sender and no other, and what one peer can make us hold is bounded by one
number.  A message is delivered only when complete, so it may not exceed
``max_message_size``, which is at most both windows; a sender reserves connection window for
a whole multi-frame message before its first fragment (:meth:`Connection.reserve`), so a
message once begun can always finish.

After a protocol error the connection is in :attr:`State.ERROR` and refuses all input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from blobmesh.errors import ProtocolError, TransportError
from blobmesh.wire.frames import (
    DATA_OVERHEAD,
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_REASON,
    MIN_FRAME_SIZE,
    Close,
    ConnectionCredit,
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
#: A Data fragment up to this size, ending its message, on a stream that never sent a bigger
#: one travels with the control frames, ahead of bulk data.
SMALL_MESSAGE = 64 * 1024
DRAIN_NONCE = 0  # the Ping after our GoAway; keepalive nonces count from 1


class Role(enum.Enum):
    """Which side dialed; dialers open odd stream ids, listeners even ones."""

    DIALER = 1
    LISTENER = 2


class State(enum.Enum):
    """Where a connection is in its life."""

    WAIT_HELLO = 1  # the peer's Hello has not arrived
    OPEN = 2
    ERROR = 3  # the peer broke the protocol: all input is refused
    CLOSED = 4  # a timer ended it (silence, idleness drained, no Hello, not admitted)


@dataclass(frozen=True, slots=True)
class Settings:
    """The limits a side enforces on what it receives (announced in its Hello)."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    stream_window: int = 10 * 1024 * 1024
    max_message_size: int = 8 * 1024 * 1024
    max_streams: int = 1024
    connection_window: int = DEFAULT_CONNECTION_WINDOW

    def __post_init__(self) -> None:
        if not MIN_FRAME_SIZE <= self.max_frame_size <= 0xFFFF_FFFF:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, 2**32)")
        if not 1 <= self.max_message_size <= self.stream_window <= 0xFFFF_FFFF:
            raise ValueError("need 1 <= max_message_size <= stream_window < 2**32")
        if not self.max_message_size <= self.connection_window <= 0xFFFF_FFFF:
            raise ValueError("need max_message_size <= connection_window < 2**32")
        if not 1 <= self.max_streams <= 0xFFFF_FFFF:
            raise ValueError("max_streams must be positive")

    def hello(self) -> Hello:
        return Hello(self.max_frame_size, self.stream_window, self.max_message_size,
                     self.max_streams)

    @classmethod
    def from_hello(cls, hello: Hello) -> Settings:
        """The peer's limits (its connection window is not in the Hello: it is granted by the
        peer's first ConnectionCredit, so ``connection_window`` here is the default)."""
        try:
            return cls(hello.max_frame_size, hello.stream_window, hello.max_message_size,
                       hello.max_streams)
        except ValueError as exc:
            raise ProtocolError(f"peer announced unusable limits: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Timers:
    """Deadlines (seconds) a :class:`Connection` enforces through :meth:`~Connection.get_timer`.

    - ``keepalive_interval``: nothing received for this long: send a Ping;
    - ``keepalive_timeout``: nothing received for this long: the connection is dead (a
      ProtocolError when a frame has been trickling in all that time: slowloris);
    - ``idle_timeout``: no stream for this long: retire (GoAway, drain, close);
    - ``hello_timeout``: the peer's Hello must arrive within this of the start;
    - ``admission_timeout``: unless :meth:`~Connection.mark_admitted` is called within this
      of the start, the connection is closed (None: no such deadline).
    """

    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0
    idle_timeout: float = 120.0
    hello_timeout: float = 10.0
    admission_timeout: float | None = None


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
    """The stream's send window grew (``stream_id`` 0: the connection's window grew)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    nonce: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer accepts no new streams."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """A timer ended the connection; close it (``error`` says why, without the peer's name)."""

    error: TransportError


Event = (HelloReceived | StreamOpened | MessageReceived | StreamEnded | StreamReset
         | CreditAvailable | PongReceived | GoAwayReceived | ConnectionTerminated)


@dataclass(slots=True)
class _Stream:
    send_open: bool = True
    recv_open: bool = True
    send_credit: int = 0
    recv_credit: int = 0  # bytes the peer may still send
    unreleased: int = 0  # consumed bytes not yet returned as credit
    parts: list[bytes] = field(default_factory=list)
    partial: int = 0  # bytes of the message being reassembled
    reserved: int = 0  # connection window reserved for the rest of the message being sent
    bulk: bool = False  # sent a large message: its frames queue behind control frames


class Connection:
    """One side of a blobmesh connection (see the module docstring)."""

    def __init__(self, role: Role, settings: Settings | None = None, *,
                 timers: Timers | None = None, now: float = 0.0) -> None:
        self.role = role
        self.local = settings or Settings()
        self.peer: Settings | None = None
        self.state = State.WAIT_HELLO
        self.error: TransportError | None = None  # why it is in ERROR or CLOSED
        #: The connection's one frame decoder: :meth:`feed` uses it; an I/O layer may instead
        #: receive into ``decoder.get_buffer()`` and pass ``decoder.advance()``'s frames (or
        #: its ProtocolError) to :meth:`receive_frames`.
        self.decoder = FrameDecoder(self.local.max_frame_size)
        self._control: list[Buffer] = []
        self._bulk: list[tuple[bytes, Buffer]] = []  # (frame header, payload) per frame
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if role is Role.DIALER else 2
        self._peer_last_id = 0  # highest id the peer opened
        self._peer_streams = 0  # open streams the peer opened
        self.goaway_sent = False
        self.goaway_received = False
        self.retired = False  # we sent GoAway and the drain Ping
        self._drained = False  # the drain Pong came back: no Open of the peer is in flight
        self._send_window = 0  # connection-level credit for what we send
        self._recv_window = self.local.connection_window  # what the peer may still send
        self._unreleased = 0  # consumed payload bytes not yet returned as connection credit
        self._timers = timers
        self._admitted = timers is None or timers.admission_timeout is None
        self._now = self._started = self._last_rx = self._ping_at = self._busy_at = now
        self._had_streams = False  # a stream existed since the clock last advanced
        self._nonce = DRAIN_NONCE
        self._control.append(encode_frame(self.local.hello()))
        self._control.append(encode_frame(ConnectionCredit(self.local.connection_window)))

    # --- input -------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview, now: float | None = None,
             ) -> list[Event]:
        """Process received bytes; raises :class:`ProtocolError` on anything invalid.

        After a ProtocolError the connection is in ERROR (events of earlier frames in the
        same call are lost; :meth:`receive_frames` keeps them).
        """
        self._check_input()
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            raise self._fail(exc) from None
        events = self.receive_frames(frames, now)
        if events and isinstance(end := events[-1], ConnectionTerminated):
            assert isinstance(end.error, ProtocolError)
            raise end.error
        return events

    def receive_frames(self, frames: list[Frame], now: float | None = None, *,
                       error: ProtocolError | None = None) -> list[Event]:
        """Process frames from :attr:`decoder`, then ``error`` if decoding failed after them.

        The first invalid frame (or ``error``) puts the connection in ERROR and ends the
        events with :class:`ConnectionTerminated` carrying the :class:`ProtocolError`; the
        events of the frames before it are kept.  Input in ERROR raises ProtocolError.
        """
        self._check_input()
        if now is not None:
            self._observe(now)
            if frames:
                self._last_rx = now
        events: list[Event] = []
        try:
            for frame in frames:
                self._receive(frame, events)
            if error is not None:
                raise error
        except ProtocolError as exc:
            events.append(ConnectionTerminated(self._fail(exc)))
        return events

    def _check_input(self) -> None:
        if self.state is State.ERROR:
            raise ProtocolError(f"input after a protocol error ({self.error})")
        if self.state is State.CLOSED:
            raise ProtocolError(f"input after the connection closed ({self.error})")

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self.state = State.ERROR
        self.error = exc
        return exc

    def _receive(self, frame: Frame, events: list[Event]) -> None:
        msg = frame.message
        if self.peer is None:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected Hello, got {type(msg).__name__}")
            self.peer = Settings.from_hello(msg)
            self.state = State.OPEN
            events.append(HelloReceived(self.peer))
            return
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
            case ConnectionCredit():
                self._send_window += msg.amount
                if self._send_window > _MAX_CREDIT:
                    raise ProtocolError("peer granted an absurd connection window")
                if self._streams:  # else nobody waits (e.g. the initial grant)
                    events.append(CreditAvailable(0))
            case Open():
                self._on_open(msg, events)
            case Close():
                self._on_close(msg, events)
            case Reset():
                if (s := self._known(msg.stream_id)) is not None:
                    self._forget(msg.stream_id, s)
                    events.append(StreamReset(msg.stream_id, msg.reason))
            case Ping():
                self._control.append(encode_frame(Pong(msg.nonce)))
            case Pong():
                if msg.nonce == DRAIN_NONCE and self.retired:
                    self._drained = True
                events.append(PongReceived(msg.nonce))
            case GoAway():
                self.goaway_received = True
                events.append(GoAwayReceived(msg.reason))
            case Hello():
                raise ProtocolError("second Hello")

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
        if self._peer_streams >= self.local.max_streams:
            self._control.append(encode_frame(Reset(msg.stream_id, "too many streams")))
            return
        assert self.peer is not None
        self._peer_streams += 1
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
        n = len(payload)
        if n > self._recv_window:
            raise ProtocolError(f"{n} bytes exceed the connection window")
        self._recv_window -= n
        s = self._known(msg.stream_id)
        if s is None:
            self._release(n)  # dropped at once: the window is free again
            return
        if not s.recv_open:
            raise ProtocolError(f"data on stream {msg.stream_id} after the peer closed it")
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

    def data_to_send(self, now: float | None = None) -> list[Buffer]:
        """Buffers to write, in order (payloads are the caller's own buffers, uncopied)."""
        control, bulk = self.data_to_send_by_priority(now)
        for header, payload in bulk:
            control.append(header)
            if payload:
                control.append(payload)
        return control

    def data_to_send_by_priority(self, now: float | None = None,
                                 ) -> tuple[list[Buffer], list[tuple[bytes, Buffer]]]:
        """``(control, bulk)``, each in order; control may be written ahead of bulk, but only
        between two bulk frames, so bulk comes as ``(header, payload)`` (payload may be empty).

        Control holds every frame but Data and Close of bulk streams (those that sent a
        message over :data:`SMALL_MESSAGE` or in several fragments), so pings, credit and
        small messages are not stuck behind megabytes of payload.  Order within a stream is
        kept: a stream only ever moves from control to bulk.
        """
        if now is not None:
            self._observe(now)
        control, self._control = self._control, []
        bulk, self._bulk = self._bulk, []
        return control, bulk

    def open_stream(self, protocol: str) -> int:
        """Open a stream; returns its id.  Needs the peer's Hello first."""
        if self.peer is None or self.state is not State.OPEN:
            raise TransportError("cannot open a stream before the peer's Hello"
                                 if self.peer is None else "connection is closed")
        if self.goaway_sent or self.goaway_received:
            raise TransportError("connection is going away")
        ours = len(self._streams) - self._peer_streams
        if ours >= self.peer.max_streams:
            raise TransportError(f"peer allows at most {self.peer.max_streams} streams")
        stream_id = self._next_id
        self._next_id += 2
        self._control.append(encode_frame(Open(stream_id, protocol)))
        self._streams[stream_id] = _Stream(send_credit=self.peer.stream_window,
                                           recv_credit=self.local.stream_window)
        return stream_id

    def send_budget(self, stream_id: int) -> int:
        """How many payload bytes :meth:`send_data` accepts now (windows and frame size)."""
        s = self._sendable(stream_id)
        assert self.peer is not None
        window = s.reserved or self._send_window
        return min(s.send_credit, window, self.peer.max_frame_size - DATA_OVERHEAD)

    def reserve(self, stream_id: int, size: int) -> bool:
        """Before the first fragment of a ``size``-byte message: take connection window for
        all of it (so a begun message never waits for window other streams hold).  False:
        not enough window now; wait for ``CreditAvailable(0)`` and try again."""
        s = self._sendable(stream_id)
        if s.reserved:
            return True
        if size > self._send_window:
            return False
        self._send_window -= size
        s.reserved = size
        return True

    def send_data(self, stream_id: int, data: Buffer, *, more: bool = False,
                  head: bytes = b"") -> None:
        """Send a message fragment (``more`` = further fragments follow) within the budget.

        The fragment is ``head + data``, but only the few bytes of ``head`` are copied (into
        the frame's header buffer): ``data`` is written out as it is."""
        n = len(head) + len(data)
        if n > self.send_budget(stream_id):
            raise ValueError(f"{n} bytes exceed the send budget of stream {stream_id}")
        s = self._streams[stream_id]
        s.send_credit -= n
        if s.reserved:
            s.reserved -= n
        else:
            self._send_window -= n
        if more or n > SMALL_MESSAGE:
            s.bulk = True
        header = frame_header(Data(stream_id, more), n) + head
        if s.bulk:
            self._bulk.append((header, data))
        else:
            self._control.append(header)
            if data:
                self._control.append(data)

    def close_stream(self, stream_id: int) -> None:
        """Half-close: send nothing more on the stream."""
        s = self._sendable(stream_id)
        s.send_open = False
        if s.bulk:
            self._bulk.append((encode_frame(Close(stream_id)), b""))
        else:
            self._control.append(encode_frame(Close(stream_id)))
        self._drop_if_done(stream_id, s)

    def reset_stream(self, stream_id: int, reason: str = "") -> None:
        """Abort the stream both ways (no-op if it is already gone)."""
        s = self._streams.get(stream_id)
        if s is not None:
            self._forget(stream_id, s)
            self._control.append(encode_frame(Reset(stream_id, reason[:MAX_REASON])))

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took (or dropped) ``n`` bytes of messages; return credit in batches.

        Call it for every delivered message, also after its stream is gone: the connection
        window is only freed here.
        """
        self._release(n)
        s = self._streams.get(stream_id)
        if s is None or not s.recv_open:
            return
        s.unreleased += n
        if s.unreleased >= _batch(self.local.stream_window, self.local.max_message_size):
            s.recv_credit += s.unreleased
            self._control.append(encode_frame(Credit(stream_id, s.unreleased)))
            s.unreleased = 0

    def send_ping(self, nonce: int) -> None:
        self._control.append(encode_frame(Ping(nonce)))

    def send_goaway(self, reason: str = "") -> None:
        """Refuse new streams from now on (open ones continue)."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._control.append(encode_frame(GoAway(reason[:MAX_REASON])))

    def retire(self, reason: str) -> None:
        """GoAway, then a Ping whose Pong proves no Open of the peer is still in flight; the
        connection ends (:class:`ConnectionTerminated` at the next timer) once that Pong is
        back and no stream is open."""
        if self.retired or self.state is not State.OPEN:
            return
        self.retired = True
        self.send_goaway(reason)
        self.send_ping(DRAIN_NONCE)

    def mark_admitted(self) -> None:
        """The peer was admitted: cancel the admission deadline."""
        self._admitted = True

    def stream_count(self) -> int:
        return len(self._streams)

    # --- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (None: no timers, or the connection ended)."""
        t = self._timers
        if t is None or self.state in (State.ERROR, State.CLOSED):
            return None
        if self.peer is None:
            return self._started + t.hello_timeout
        when = min(self._last_rx + t.keepalive_timeout,
                   max(self._last_rx, self._ping_at) + t.keepalive_interval)
        if not self._admitted and t.admission_timeout is not None:
            when = min(when, self._started + t.admission_timeout)
        if self.retired:
            if self._drained and not self._streams:
                return self._now
        elif not self._streams and not self._had_streams:
            when = min(when, self._busy_at + t.idle_timeout)
        return when

    def handle_timer(self, now: float) -> list[Event]:
        """Act on every deadline that passed: Ping, retire, or :class:`ConnectionTerminated`."""
        t = self._timers
        if t is None or self.state in (State.ERROR, State.CLOSED):
            return []
        self._observe(now)
        if self.peer is None:
            if now >= self._started + t.hello_timeout:
                return self._terminate(ProtocolError(f"no Hello within {t.hello_timeout:g}s"))
            return []
        if now >= self._last_rx + t.keepalive_timeout:
            if self.decoder.buffered:
                return self._terminate(ProtocolError(
                    f"one frame took over {t.keepalive_timeout:g}s to arrive (slowloris)"))
            return self._terminate(TransportError(f"silent for {t.keepalive_timeout:g}s"))
        if (not self._admitted and t.admission_timeout is not None
                and now >= self._started + t.admission_timeout):
            return self._terminate(TransportError(
                f"not admitted within {t.admission_timeout:g}s"))
        if self.retired and self._drained and not self._streams:
            return self._terminate(TransportError("connection retired"))
        if now >= max(self._last_rx, self._ping_at) + t.keepalive_interval:
            self._nonce += 1
            self.send_ping(self._nonce)
            self._ping_at = now
        if not self.retired and not self._streams and now >= self._busy_at + t.idle_timeout:
            self.retire("idle")
        return []

    def _observe(self, now: float) -> None:
        self._now = now
        if self._streams or self._had_streams:
            self._busy_at = now
            self._had_streams = False

    def _terminate(self, error: TransportError) -> list[Event]:
        self.state = State.ERROR if isinstance(error, ProtocolError) else State.CLOSED
        self.error = error
        return [ConnectionTerminated(error)]

    # --- internals ---------------------------------------------------------------------------

    def _sendable(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise TransportError(f"stream {stream_id} is reset or unknown")
        if not s.send_open:
            raise TransportError(f"stream {stream_id} is closed for sending")
        if self.peer is None:
            raise TransportError("no Hello from the peer yet")
        return s

    def _release(self, n: int) -> None:
        self._unreleased += n
        if self._unreleased >= _batch(self.local.connection_window,
                                      self.local.max_message_size):
            self._recv_window += self._unreleased
            self._control.append(encode_frame(ConnectionCredit(self._unreleased)))
            self._unreleased = 0

    def _drop_if_done(self, stream_id: int, s: _Stream) -> None:
        if not s.send_open and not s.recv_open:
            self._forget(stream_id, s)

    def _forget(self, stream_id: int, s: _Stream) -> None:
        del self._streams[stream_id]
        if (stream_id % 2 == 1) != (self.role is Role.DIALER):
            self._peer_streams -= 1
        self._had_streams = True
        self._send_window += s.reserved  # never sent: ours again
        if s.partial:
            self._release(s.partial)  # the half-received message is dropped
            s.parts.clear()


def _batch(window: int, max_message: int) -> int:
    """Consumed bytes returned as credit at once: a quarter of the window, but never so many
    that what is held back (at most one byte less) leaves less than a whole message of window,
    or a message as large as the window, sent after smaller ones, would wait for ever."""
    return max(1, min(window // 4, window - max_message + 1))
