"""One TLS connection to a peer: blocking-socket I/O threads around the wire state machine.

asyncio's SSL transport moves about half of what blocking ``ssl`` sockets do on the same
machine (both encrypt in C, but the former copies through memory BIOs on the event loop's
thread).  So each connection runs a reader thread (``recv_into`` straight into the frame
decoder's buffer, decoding there) and a writer thread (``sendall`` of whole frames, payloads
uncopied); ``ssl`` releases the GIL while it encrypts, decrypts and waits.  Threads hand work
to the event loop in batches, one ``call_soon_threadsafe`` per batch.  The
:class:`~blobmesh.wire.Connection` state machine itself lives on the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blobmesh.errors import ProtocolError, StreamClosedError, TransportError
from blobmesh.transport.identity import NodeId
from blobmesh.wire import (
    DATA_OVERHEAD,
    Buffer,
    Connection,
    CreditAvailable,
    Event,
    Frame,
    FrameDecoder,
    GoAwayReceived,
    HelloReceived,
    MessageReceived,
    PongReceived,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
)

if TYPE_CHECKING:
    from blobmesh.transport.endpoint import Endpoint

log = logging.getLogger("blobmesh.transport")

_COALESCE = 64 * 1024  # buffers below this are joined into one write
_DRAIN_NONCE = 0  # the Ping after our GoAway; keepalive nonces count from 1


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

    async def send(self, message: bytes | memoryview) -> None:
        """Send one message (at most the peer's ``max_message_size``, else ValueError)."""
        view = memoryview(message)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = len(view)
        conn = self._conn
        limit = conn.peer_settings.max_message_size
        if size > limit:
            raise ValueError(f"message of {size} bytes exceeds the peer's limit of {limit}")
        # equal frames: a message just over the frame size must not leave a tiny last frame
        most = conn.peer_settings.max_frame_size - DATA_OVERHEAD
        frame = -(-size // max(1, -(-size // most)))
        async with self._send_lock:
            off = 0
            while True:
                self._check_sendable()
                budget = conn.wire_budget(self.stream_id)
                if budget == 0 and off < size:
                    self._credit.clear()
                    await self._credit.wait()
                    continue
                await conn.wait_writable()
                self._check_sendable()
                n = min(budget, frame, size - off)
                conn.send_data(self.stream_id, view[off:off + n], more=off + n < size)
                off += n
                if off >= size:
                    break
            if not view.readonly:
                await conn.wait_written(conn.queued)

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
        self._readable.set()
        self._credit.set()

    @property
    def done(self) -> bool:
        return self._error is not None or (self._eof and self._send_closed)


class PeerConnection:
    """A connected, authenticated TLS socket to ``peer`` plus its streams.

    The owning :class:`Endpoint` runs :meth:`run` as a task: it supervises keepalive and idle
    time, and on exit stops the I/O threads and closes the socket.
    """

    def __init__(self, endpoint: Endpoint, sock: ssl.SSLSocket, peer: NodeId, role: Role,
                 settings: Settings) -> None:
        self._endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self.peer = peer
        self.role = role
        self._wire = Connection(role, settings)
        self._streams: dict[int, TlsStream] = {}
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.error: TransportError | None = None
        self._closed = asyncio.Event()
        self.retired = False  # no new streams from us; close once drained
        self._drained = False  # its Pong came back: no Open can still be in flight
        self._last_rx = self._last_busy = self._loop.time()
        # reader thread -> loop
        self._decoder = FrameDecoder(settings.max_frame_size)
        self._rx_lock = threading.Lock()
        self._rx_frames: list[Frame] = []
        self._rx_scheduled = False
        # loop -> writer thread
        self._tx_cond = threading.Condition()
        self._tx: deque[Buffer] = deque()
        self._tx_stop = False
        self.queued = 0  # bytes handed to the writer (loop side)
        self._written = 0  # bytes the writer finished (written by the writer thread)
        self._want_progress = False
        self._progress: list[asyncio.Future[None]] = []
        self._high_water = max(2 * settings.max_frame_size, endpoint.config.write_buffer)
        self._reader_done: asyncio.Future[None] = self._loop.create_future()
        self._writer_done: asyncio.Future[None] = self._loop.create_future()
        sock.setblocking(True)
        self._flush()  # our Hello
        for target, name in ((self._read_loop, "rx"), (self._write_loop, "tx")):
            threading.Thread(target=target, name=f"blobmesh-{name}-{peer.short()}",
                             daemon=True).start()

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
        return (self.error is None and not self.retired and not self._wire.goaway_received
                and not self._wire.goaway_sent)

    @property
    def dialer(self) -> NodeId:
        return self._endpoint.node_id if self.role is Role.DIALER else self.peer

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
        if self.error is not None or self.retired:
            return
        self.retired = True
        self._wire.send_goaway(reason)
        self._wire.send_ping(_DRAIN_NONCE)
        self._flush()

    def close(self, error: TransportError) -> None:
        """Fail every stream with ``error`` and let :meth:`run` tear the connection down."""
        if self.error is not None:
            return
        self.error = error
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # the dialer may have stopped waiting; don't warn
        for stream in self._streams.values():
            stream._fail(error)
        self._streams.clear()
        self._wake_progress()
        self._closed.set()
        self._endpoint._connection_closed(self)

    # --- used by TlsStream -----------------------------------------------------------------

    def wire_budget(self, stream_id: int) -> int:
        return self._wire.send_budget(stream_id)

    def send_data(self, stream_id: int, data: memoryview, *, more: bool) -> None:
        self._wire.send_data(stream_id, data, more=more)
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
            self._touch()

    async def wait_writable(self) -> None:
        """Backpressure: wait while the writer thread has too much queued."""
        await self._wait(lambda: self.queued - self._written <= self._high_water)

    async def wait_written(self, offset: int) -> None:
        """Wait until the writer has written the first ``offset`` bytes ever queued."""
        await self._wait(lambda: self._written >= offset)

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if self.error is not None:
                raise self.error
            fut = self._loop.create_future()
            self._progress.append(fut)
            # set the flag before re-checking: the writer updates _written, then reads it
            self._want_progress = True
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
        out = self._wire.data_to_send()
        if not out or self.error is not None:
            return
        self.queued += sum(len(b) for b in out)
        with self._tx_cond:
            self._tx.extend(out)
            self._tx_cond.notify()

    def _on_frames(self) -> None:
        with self._rx_lock:
            frames, self._rx_frames = self._rx_frames, []
            self._rx_scheduled = False
        if self.error is not None:
            return
        self._last_rx = self._loop.time()
        for frame in frames:
            try:
                events = self._wire.receive_frame(frame)
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            for event in events:
                self._dispatch(event)
        self._flush()

    def _dispatch(self, event: Event) -> None:
        match event:
            case MessageReceived(stream_id, data):
                if (s := self._streams.get(stream_id)) is not None:
                    s._on_message(data)
            case CreditAvailable(stream_id):
                if (s := self._streams.get(stream_id)) is not None:
                    s._on_credit()
            case StreamOpened(stream_id, protocol):
                stream = TlsStream(self, stream_id, protocol)
                self._streams[stream_id] = stream
                self._touch()
                self._endpoint._serve(stream)
            case StreamEnded(stream_id):
                if (s := self._streams.get(stream_id)) is not None:
                    s._on_eof()
                    self._forget_if_done(s)
            case StreamReset(stream_id, reason):
                if (s := self._streams.pop(stream_id, None)) is not None:
                    s._fail(TransportError(
                        f"stream reset by {self.peer.short()}{': ' + reason if reason else ''}",
                        peer=self.peer))
                    self._touch()
            case PongReceived(nonce):
                if nonce == _DRAIN_NONCE and self.retired:
                    self._drained = True
            case GoAwayReceived():
                self._endpoint._connection_unusable(self)
            case HelloReceived():
                if not self.ready.done():
                    self.ready.set_result(None)

    def _forget_if_done(self, stream: TlsStream) -> None:
        if stream.done:
            self._streams.pop(stream.stream_id, None)
            self._touch()

    def _touch(self) -> None:
        self._last_busy = self._loop.time()

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("closing connection to %s: protocol error: %s", self.peer, exc)
        self.close(ProtocolError(f"protocol error from {self.peer.short()}: {exc}",
                                 peer=self.peer))

    def _on_reader_done(self, error: TransportError) -> None:
        if isinstance(error, ProtocolError):
            self._protocol_error(error)
        else:
            self.close(error)

    async def run(self) -> None:
        """Supervise keepalive and idleness until closed, then release threads and socket."""
        cfg = self._endpoint.config
        tick = min(cfg.keepalive_interval, cfg.idle_timeout) / 2
        nonce = 0
        try:
            while self.error is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await self._closed.wait()
                if self.error is not None:
                    break
                now = self._loop.time()
                if now - self._last_rx > cfg.keepalive_timeout:
                    self.close(TransportError(
                        f"{self.peer.short()} silent for {cfg.keepalive_timeout:g}s",
                        peer=self.peer))
                    break
                if now - self._last_rx >= cfg.keepalive_interval:
                    nonce += 1
                    self._wire.send_ping(nonce)
                    self._flush()
                if self._streams:
                    self._touch()
                elif self._drained:
                    self.close(TransportError("connection retired", peer=self.peer))
                elif now - self._last_busy >= cfg.idle_timeout:
                    self.retire("idle")
        finally:
            if self.error is None:
                self.close(TransportError("endpoint closed", peer=self.peer))
            await self._teardown()

    async def _teardown(self) -> None:
        with self._tx_cond:
            self._tx_stop = True
            self._tx_cond.notify()
        # let the writer flush a GoAway, but a peer that stopped reading can't hold us up
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await asyncio.shield(self._writer_done)
        with contextlib.suppress(OSError):
            # socket.shutdown, not SSLSocket's, which would detach the SSL object under
            # the threads' feet; this wakes both threads with EOF/EPIPE
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        await asyncio.shield(asyncio.gather(self._writer_done, self._reader_done))
        self._sock.close()

    # --- threads ---------------------------------------------------------------------------

    def _call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(callback, *args)

    def _read_loop(self) -> None:
        decoder = self._decoder
        sock = self._sock
        error: TransportError
        try:
            while True:
                n = sock.recv_into(decoder.get_buffer())
                if n == 0:
                    error = TransportError(f"{self.peer.short()} closed the connection",
                                           peer=self.peer)
                    break
                frames = decoder.advance(n)
                if frames:
                    with self._rx_lock:
                        self._rx_frames.extend(frames)
                        if self._rx_scheduled:
                            continue
                        self._rx_scheduled = True
                    self._call_soon(self._on_frames)
        except ProtocolError as exc:
            error = exc
        except (OSError, ValueError) as exc:
            error = TransportError(f"connection to {self.peer.short()} lost: {exc}",
                                   peer=self.peer)
        self._call_soon(self._on_reader_done, error)
        self._call_soon(resolve_future, self._reader_done)

    def _write_loop(self) -> None:
        sock = self._sock
        try:
            while True:
                with self._tx_cond:
                    while not self._tx and not self._tx_stop:
                        self._tx_cond.wait()
                    if not self._tx:
                        return
                    batch = list(self._tx)
                    self._tx.clear()
                small = bytearray()
                for buf in batch:
                    if len(buf) < _COALESCE:
                        small += buf
                        continue
                    if small:
                        sock.sendall(small)
                        small.clear()
                    sock.sendall(buf)
                if small:
                    sock.sendall(small)
                self._written += sum(len(b) for b in batch)
                del batch
                if self._want_progress:
                    self._want_progress = False
                    self._call_soon(self._wake_progress)
        except (OSError, ValueError) as exc:
            self._call_soon(self.close, TransportError(
                f"connection to {self.peer.short()} lost: {exc}", peer=self.peer))
        finally:
            self._call_soon(self._wake_progress)
            self._call_soon(resolve_future, self._writer_done)


def resolve_future(fut: asyncio.Future[None]) -> None:
    """Complete ``fut`` unless it already is (callbacks that may fire late or twice)."""
    if not fut.done():
        fut.set_result(None)
