"""One TLS connection to a peer: the wire state machine on the event loop, its socket on an
I/O thread (:mod:`blobmesh.transport.io`).

The :class:`~blobmesh.wire.Connection` core lives on the event loop only and decides
everything (frames, credit, keepalive, idleness, admission deadline: one ``call_at`` re-armed
from its ``get_timer()``); the I/O thread that owns the TLS socket only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol

from blobmesh.errors import ProtocolError, StreamClosedError, TransportError
from blobmesh.transport.identity import NodeId
from blobmesh.transport.io import Channel, IoPool
from blobmesh.wire import (
    DATA_OVERHEAD,
    Connection,
    ConnectionTerminated,
    CreditAvailable,
    Event,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    Timers,
)

log = logging.getLogger("blobmesh.transport")

_LINGER = 0.5  # seconds a closing connection may spend writing its last frames


class ConnectionOwner(Protocol):
    """What a :class:`PeerConnection` tells the endpoint that owns it."""

    @property
    def node_id(self) -> NodeId: ...

    def serve_stream(self, stream: TlsStream) -> None:
        """The peer opened ``stream``: run its handler (or reset it)."""

    def connection_unusable(self, conn: PeerConnection) -> None:
        """``conn`` takes no new streams (GoAway)."""

    def connection_closed(self, conn: PeerConnection) -> None:
        """``conn`` is closed."""


class TlsStream:
    """A stream over a :class:`PeerConnection` (implements :class:`~blobmesh.transport.Stream`).

    ``send`` does not copy its argument: ``bytes`` and read-only memoryviews are queued as
    they are; a writable buffer (bytearray, writable memoryview) is only returned to the
    caller once the writer thread is done with it, so reusing it afterwards is safe.
    """

    def __init__(self, conn: PeerConnection, stream_id: int, protocol: str) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._protocol = protocol
        self._inbox: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._framing = 0  # sends that have not yet queued their last frame
        self._eof = False
        self._send_closed = False
        self._abandoned = False  # nobody will read: consume arrivals at once
        self._error: TransportError | None = None

    @property
    def peer(self) -> NodeId:
        return self._conn.peer

    @property
    def protocol(self) -> str:
        return self._protocol

    async def send(self, message: bytes | memoryview, *, flush: bool = False,
                   head: bytes = b"") -> None:
        """Send one message, ``head + message`` (at most the peer's ``max_message_size``,
        else ValueError) without joining the two: only ``head`` is copied.  With ``flush``,
        wait until everything queued before this message was written to the socket: the
        transport then holds at most this message, and the socket does not run dry while the
        caller prepares the next one.  A writable buffer (which the caller may reuse once this
        returns) is waited for until it was written itself."""
        view = memoryview(message)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        lead = len(head)
        size = lead + len(view)
        conn = self._conn
        limit = conn.peer_settings.max_message_size
        if size > limit:
            raise ValueError(f"message of {size} bytes exceeds the peer's limit of {limit}")
        # equal frames: a message just over the frame size must not leave a tiny last frame
        most = conn.peer_settings.max_frame_size - DATA_OVERHEAD
        frame = -(-size // max(1, -(-size // most)))
        self._framing += 1
        try:
            start, end = await self._frame(view, head, size, frame)
        finally:
            self._framing -= 1
        if not view.readonly:
            await conn.wait_written(end)
        elif flush:
            # (outside the lock: a message queued meanwhile goes out right after this one)
            await conn.wait_written(start)

    async def _frame(self, view: memoryview, head: bytes, size: int, frame: int
                     ) -> tuple[int, int]:
        """Queue every frame of one message; returns :attr:`PeerConnection.queued` before its
        first frame and after its last."""
        conn = self._conn
        lead = len(head)
        async with self._send_lock:
            # the connection window for all of it first, so a begun message always finishes
            while not conn.reserve(self, size):
                self._credit.clear()
                await self._credit.wait()
            start = conn.queued
            off = 0  # into the whole message, head included
            while True:
                self._check_sendable()
                budget = conn.wire_budget(self.stream_id)
                # wait for stream credit for a whole frame rather than split one: the peer
                # would join the parts (a copy of the message); it always comes, since the
                # peer holds back less credit than a message
                if budget < min(frame, size - off):
                    self._credit.clear()
                    await self._credit.wait()
                    continue
                await conn.wait_writable()
                self._check_sendable()
                n = min(budget, frame, size - off)
                part = head[off:off + n] if off < lead else b""
                at = max(0, off - lead)
                conn.send_data(self.stream_id, view[at:at + n - len(part)],
                               more=off + n < size, head=part)
                off += n
                if off >= size:
                    break
            return start, conn.queued

    def try_send(self, message: bytes) -> bool:
        """Send a small message at once, without waiting, when nothing stands in its way: no
        other send of this stream still framing, stream credit and connection window for all
        of it, one frame, and the I/O thread's queue under its high-water mark.  False:
        nothing was sent (:meth:`send` it).  Raises TransportError when the stream is broken.

        No task switch, lock or timer: for the many small messages of a protocol (a swarm's
        haves and requests) that would otherwise each wake a writer task."""
        if self._framing or self._error is not None or self._send_closed:
            return False
        conn = self._conn
        n = len(message)
        if not conn.writable_now() or conn.wire_budget(self.stream_id) < n or \
                not conn.reserve(self, n):
            return False
        conn.send_data(self.stream_id, memoryview(message), more=False, head=b"")
        return True

    async def recv(self) -> bytes:
        """The next message; StreamClosedError at the peer's close, TransportError if broken."""
        while not self._inbox:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise StreamClosedError(f"{self.peer.short()} closed the stream",
                                        peer=self.peer)
            self._readable.clear()
            await self._readable.wait()
        data = self._inbox.popleft()
        self._conn.consumed(self.stream_id, len(data))
        return data

    async def close(self) -> None:
        """Close our sending side (after any send in progress)."""
        async with self._send_lock:
            if self._send_closed or self._error is not None:
                return
            self._send_closed = True
            self._conn.close_stream(self)

    def reset(self, reason: str = "") -> None:
        """Abort both directions; pending and later calls raise TransportError."""
        if self._error is None:
            self._conn.reset_stream(self, reason)
            self._fail(TransportError(f"stream reset{': ' + reason if reason else ''}",
                                      peer=self.peer))

    async def finish(self) -> None:
        """Used when a handler returns: close our side, discard whatever still arrives."""
        await self.close()
        self._abandoned = True
        while self._inbox:
            self._conn.consumed(self.stream_id, len(self._inbox.popleft()))

    def _check_sendable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._send_closed:
            raise TransportError("send on a closed stream", peer=self.peer)

    # --- called by PeerConnection ----------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        if self._abandoned:
            self._conn.consumed(self.stream_id, len(data))
            return
        self._inbox.append(data)
        self._readable.set()

    def _on_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_credit(self) -> None:
        self._credit.set()

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
        while self._inbox:  # nobody will read these: free the connection window
            self._conn.consumed(self.stream_id, len(self._inbox.popleft()))
        self._readable.set()
        self._credit.set()

    @property
    def done(self) -> bool:
        return self._error is not None or (self._eof and self._send_closed)


class PeerConnection:
    """A connected, authenticated TLS socket to ``peer`` plus its streams.

    The owning endpoint runs :meth:`run` as a task: it returns once the connection is closed
    and its I/O thread has closed the socket.
    """

    def __init__(self, owner: ConnectionOwner, sock: ssl.SSLSocket, peer: NodeId, role: Role,
                 settings: Settings, timers: Timers, io: IoPool, *, write_buffer: int) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self.peer = peer
        self.role = role
        self._wire = Connection(role, settings, timers=timers, now=self._loop.time())
        self._streams: dict[int, TlsStream] = {}
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.error: TransportError | None = None
        self._closed = asyncio.Event()
        self._io_done: asyncio.Future[None] = self._loop.create_future()
        self._last_rx = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._progress: list[asyncio.Future[None]] = []
        self._high_water = max(2 * settings.max_frame_size, write_buffer)
        self._channel = Channel(
            sock, self._wire.decoder, self._loop,
            write_limit=self._high_water + 2 * settings.max_frame_size,
            on_frames=self._on_frames, on_progress=self._wake_progress,
            on_closed=lambda: resolve_future(self._io_done), name=peer.short())
        self._flush()  # our Hello
        io.attach(self._channel)
        self._rearm()

    # --- state -----------------------------------------------------------------------------

    @property
    def peer_settings(self) -> Settings:
        assert self._wire.peer is not None, "used before the peer's Hello"
        return self._wire.peer

    @property
    def last_rx(self) -> float:
        """Event-loop time at which the last frames arrived from the peer."""
        return self._last_rx

    @property
    def usable(self) -> bool:
        """Open, not retired, and the peer accepts new streams."""
        return (self.error is None and not self._wire.goaway_received
                and not self._wire.goaway_sent)

    @property
    def dialer(self) -> NodeId:
        return self._owner.node_id if self.role is Role.DIALER else self.peer

    @property
    def socket_closed(self) -> asyncio.Future[None]:
        """Done once the I/O thread closed the socket (after :meth:`close` and its linger)."""
        return self._io_done

    @property
    def queued(self) -> int:
        """Bytes ever handed to the I/O thread."""
        return self._channel.queued

    def open_stream(self, protocol: str) -> TlsStream:
        if self.error is not None:
            raise self.error
        stream_id = self._wire.open_stream(protocol)
        stream = TlsStream(self, stream_id, protocol)
        self._streams[stream_id] = stream
        self._flush()
        return stream

    def retire(self, reason: str) -> None:
        """Stop using this connection for new streams; it closes once its streams finish."""
        if self.error is None:
            self._wire.retire(reason)
            self._flush()
            self._rearm()

    def mark_admitted(self) -> None:
        """The peer was admitted: no admission deadline for this connection any more."""
        self._wire.mark_admitted()

    def close(self, error: TransportError) -> None:
        """Fail every stream with ``error`` and let :meth:`run` tear the connection down."""
        if self.error is not None:
            return
        self.error = error
        if self._timer is not None:
            self._timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # the dialer may have stopped waiting; don't warn
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)
        self._wake_progress()
        self._closed.set()
        self._channel.close(_LINGER)
        self._owner.connection_closed(self)

    async def run(self) -> None:
        """Wait until closed (by either side, an error or a timer) and the socket is shut."""
        try:
            await self._closed.wait()
        finally:
            if self.error is None:
                self.close(TransportError("endpoint closed", peer=self.peer))
            await asyncio.shield(self._io_done)

    # --- used by TlsStream -----------------------------------------------------------------

    def wire_budget(self, stream_id: int) -> int:
        return self._wire.send_budget(stream_id)

    def reserve(self, stream: TlsStream, size: int) -> bool:
        stream._check_sendable()
        return self._wire.reserve(stream.stream_id, size)

    def send_data(self, stream_id: int, data: memoryview, *, more: bool, head: bytes) -> None:
        self._wire.send_data(stream_id, data, more=more, head=head)
        self._flush()

    def consumed(self, stream_id: int, n: int) -> None:
        if self.error is None:
            self._wire.consumed(stream_id, n)
            self._flush()

    def close_stream(self, stream: TlsStream) -> None:
        if self.error is None:
            self._wire.close_stream(stream.stream_id)
            self._flush()
            self._forget_if_done(stream)

    def reset_stream(self, stream: TlsStream, reason: str) -> None:
        if self.error is None:
            self._wire.reset_stream(stream.stream_id, reason)
            self._flush()
            self._streams.pop(stream.stream_id, None)
            self._rearm()

    def writable_now(self) -> bool:
        """Open, and the I/O thread's queue is under the high-water mark."""
        return self.error is None and self._channel.backlog <= self._high_water

    async def wait_writable(self) -> None:
        """Backpressure: wait while the I/O thread has more than the high-water mark queued;
        once it has, wake when half of that is left (one wakeup per many writes)."""
        channel, high = self._channel, self._high_water
        await self._wait(lambda: channel.backlog <= high, lambda: channel.queued - high // 2)

    async def wait_written(self, offset: int) -> None:
        """Wait until the first ``offset`` bytes ever queued were written."""
        await self._wait(lambda: self._channel.written >= offset, lambda: offset)

    async def _wait(self, done: Callable[[], bool], wake_at: Callable[[], int]) -> None:
        while not done():
            if self.error is not None:
                raise self.error
            fut = self._loop.create_future()
            self._progress.append(fut)
            self._channel.wake_at(wake_at())  # before re-checking (see Channel.wake_at)
            if done():
                break
            await fut

    def _wake_progress(self) -> None:
        waiters, self._progress = self._progress, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # --- event loop side -------------------------------------------------------------------

    def _flush(self) -> None:
        control, bulk = self._wire.data_to_send_by_priority(self._loop.time())
        if (control or bulk) and self.error is None:
            self._channel.send(control, bulk)

    def _rearm(self) -> None:
        """Schedule the core's next deadline (a timer firing early just re-arms)."""
        when = self._wire.get_timer()
        if when is None or self.error is not None:
            return
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self.error is not None:
            return
        for event in self._wire.handle_timer(self._loop.time()):
            self._dispatch(event)
        self._flush()
        self._rearm()

    def _on_frames(self) -> None:
        frames, error = self._channel.take_frames()
        if self.error is not None:
            return
        now = self._loop.time()
        if frames:
            self._last_rx = now
        events = self._wire.receive_frames(
            frames, now, error=error if isinstance(error, ProtocolError) else None)
        for event in events:
            self._dispatch(event)
        if self.error is not None:
            return
        if error is not None:
            self.close(TransportError(str(error), peer=self.peer))
            return
        self._flush()
        self._rearm()
        self._channel.resume_reading()

    def _dispatch(self, event: Event) -> None:
        match event:
            case MessageReceived(stream_id, data):
                if (s := self._streams.get(stream_id)) is not None:
                    s._on_message(data)
                else:
                    self._wire.consumed(stream_id, len(data))
            case CreditAvailable(0):
                for s in self._streams.values():
                    s._on_credit()
            case CreditAvailable(stream_id):
                if (s := self._streams.get(stream_id)) is not None:
                    s._on_credit()
            case StreamOpened(stream_id, protocol):
                stream = TlsStream(self, stream_id, protocol)
                self._streams[stream_id] = stream
                self._owner.serve_stream(stream)
            case StreamEnded(stream_id):
                if (s := self._streams.get(stream_id)) is not None:
                    s._on_eof()
                    self._forget_if_done(s)
            case StreamReset(stream_id, reason):
                if (s := self._streams.pop(stream_id, None)) is not None:
                    s._fail(TransportError(
                        f"stream reset by {self.peer.short()}{': ' + reason if reason else ''}",
                        peer=self.peer))
            case GoAwayReceived():
                self._owner.connection_unusable(self)
            case HelloReceived():
                if not self.ready.done():
                    self.ready.set_result(None)
            case ConnectionTerminated(error):
                if isinstance(error, ProtocolError):
                    self._protocol_error(error)
                else:
                    self.close(type(error)(f"{self.peer.short()} {error}", peer=self.peer))

    def _forget_if_done(self, stream: TlsStream) -> None:
        if stream.done:
            self._streams.pop(stream.stream_id, None)
            self._rearm()

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("closing connection to %s: protocol error: %s", self.peer, exc)
        self.close(ProtocolError(f"protocol error from {self.peer.short()}: {exc}",
                                 peer=self.peer))


def resolve_future(fut: asyncio.Future[None]) -> None:
    """Complete ``fut`` unless it already is (callbacks that may fire late or twice)."""
    if not fut.done():
        fut.set_result(None)
