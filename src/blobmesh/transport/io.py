"""TLS socket I/O off the event loop, with exactly one owner per TLS object.

OpenSSL forbids using one ``SSL`` object from two threads at once, so every connection's
socket belongs to one :class:`IoThread` of an :class:`IoPool`: that thread alone reads,
writes, and closes it (the event loop only runs the handshake, before handing it over).  A
thread serves several connections with non-blocking sockets and ``epoll``; ``ssl`` releases
the GIL while it encrypts and decrypts, so crypto runs beside the event loop.

The event loop and the thread meet in a :class:`Channel`: two send queues (control frames
are written before bulk data) and a list of received frames, under one lock.  Wakeups are
batched both ways: the loop wakes a thread only when it had found the channel's queues empty,
and a thread schedules one loop callback per batch of frames, never one per frame.

Memory stays bounded whatever the peer does: a thread stops reading a connection while the
loop has not taken :data:`RX_FRAMES_MAX` frames it already delivered, or while more than
``write_limit`` bytes wait to be written (a peer that floods us with Pings but never reads
our Pongs is stopped by TCP backpressure, not by our memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from blobmesh.errors import ProtocolError, TransportError
from blobmesh.wire import Buffer, Frame, FrameDecoder

log = logging.getLogger("blobmesh.transport")

#: Frames delivered to the loop and not yet processed before the thread stops reading.
RX_FRAMES_MAX = 4096
#: Bytes read from one connection before the thread delivers them and turns to its other
#: connections: about one large frame, so few payload buffers are alive at once (several
#: freed together make glibc return the pages, and the next payloads fault them back in).
_READ_BUDGET = 1024 * 1024
_COALESCE = 64 * 1024  # queued buffers below this are joined into one TLS write
_NEVER = 1 << 62


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_io_threads() -> int:
    """I/O threads for a pool by default: one on a machine of at most two CPUs, else two.

    Every thread that runs Python competes for the GIL with the event loop: on two CPUs a
    second I/O thread costs more in GIL hand-offs and wakeups than its crypto beside the
    first one gains (measured: 512 MiB from one source to four targets on loopback, node
    CPU per GiB delivered 7.2 -> 5.9 with one, medians of 2, same period)."""
    return 1 if usable_cpus() <= 2 else 2


class Channel:
    """The shared state of one connection between the event loop and its I/O thread.

    The loop side calls :meth:`send`, :meth:`take_frames` then :meth:`resume_reading`, and
    :meth:`close`; callbacks run on the loop: ``on_frames()`` when frames (or an error)
    arrived, ``on_progress()`` once :attr:`written` reaches :meth:`wake_at`'s offset, and
    ``on_closed()`` once the thread closed the socket.
    """

    def __init__(self, sock: ssl.SSLSocket, decoder: FrameDecoder,
                 loop: asyncio.AbstractEventLoop, *, write_limit: int,
                 on_frames: Callable[[], None], on_progress: Callable[[], None],
                 on_closed: Callable[[], None], name: str) -> None:
        self.sock = sock
        self.name = name
        self._decoder = decoder
        self._loop = loop
        self._on_frames = on_frames
        self._on_progress = on_progress
        self._on_closed = on_closed
        self._lock = threading.Lock()
        # loop -> thread (under _lock)
        self._control: deque[Buffer] = deque()
        self._bulk: deque[tuple[bytes, Buffer]] = deque()  # (frame header, payload)
        self._tx_idle = True  # the thread found both queues empty: the next send wakes it
        self._closing = False
        self._close_by = 0.0  # monotonic deadline to flush what is queued
        # thread -> loop (under _lock)
        self._rx: list[Frame] = []
        self._rx_error: TransportError | None = None
        self._rx_scheduled = False
        self._rx_paused = False
        #: bytes ever queued (loop) and written (thread); their difference is the backlog
        self.queued = 0
        self.written = 0
        self.write_limit = write_limit
        self._wake_written = _NEVER  # call on_progress once `written` reaches this
        # thread only
        self._current: memoryview | None = None  # a write the socket did not take yet
        self._payload: Buffer | None = None  # of the bulk frame whose header went out
        self._want_write = False
        self._reading = True
        self._more = False  # the last read stopped early: service again without waiting
        self._broken = False
        self._done = False
        self._mask = 0
        self.fd = sock.fileno()
        self._pool: IoPool | None = None

    # --- loop side ---------------------------------------------------------------------------

    def send(self, control: list[Buffer], bulk: list[tuple[bytes, Buffer]]) -> None:
        """Queue buffers for writing: control ones go ahead of bulk frames (never inside one)."""
        n = sum(map(len, control)) + sum(len(h) + len(p) for h, p in bulk)
        with self._lock:
            self._control.extend(control)
            self._bulk.extend(bulk)
            self.queued += n
            kick, self._tx_idle = self._tx_idle, False
        if kick:
            self._kick()

    def take_frames(self) -> tuple[list[Frame], TransportError | None]:
        """The frames received since the last call, and the error that ended reading."""
        with self._lock:
            frames, self._rx = self._rx, []
            self._rx_scheduled = False
            return frames, self._rx_error

    def resume_reading(self) -> None:
        """The loop processed what it took (and queued its answers): read on if paused.

        Only now, so that at most one batch of frames has answers not yet counted in the
        backlog the thread checks before reading more."""
        with self._lock:
            kick = self._rx_paused and self._rx_error is None
        if kick:
            self._kick()

    def wake_at(self, written: int) -> None:
        """Call ``on_progress`` once ``written`` bytes were written (the earliest of all asks).

        Call it before re-checking: the thread updates :attr:`written`, then compares."""
        self._wake_written = min(self._wake_written, written)

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet written."""
        return self.queued - self.written

    def close(self, linger: float) -> None:
        """Write what is queued for up to ``linger`` seconds, then close the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._close_by = time.monotonic() + linger
        self._kick()

    def _kick(self) -> None:
        if self._pool is not None:
            self._pool.defer_kick(self)

    def _call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(callback, *args)

    # --- thread side -------------------------------------------------------------------------

    def _service(self) -> bool:
        """Write, then read, as far as the socket allows; True once the socket is closed."""
        if self._done:
            return True
        self._more = False
        if not self._broken:
            try:
                self._write()
                if self.written >= self._wake_written:
                    self._wake_written = _NEVER
                    self._call_soon(self._on_progress)
                if self._reading:
                    self._more = self._read()
            except (OSError, ValueError) as exc:
                self._broken = True
                self._reading = self._want_write = False
                self._deliver([], TransportError(f"connection to {self.name} lost: {exc}"))
        with self._lock:
            closing, close_by, idle = self._closing, self._close_by, self._tx_idle
        if closing and (idle or self._broken or time.monotonic() >= close_by):
            self._finish()
            return True
        return False

    def _write(self) -> None:
        sock = self.sock
        while True:
            buf = self._current
            if buf is None:
                buf = self._next_write()
                if buf is None:
                    self._want_write = False
                    return
            try:
                n = sock.send(buf)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                self._current = buf  # OpenSSL wants the same buffer again
                # on WantRead the next readable event retries it (services write first)
                self._want_write = isinstance(exc, ssl.SSLWantWriteError)
                return
            self.written += n
            self._current = buf[n:] if n < len(buf) else None

    def _next_write(self) -> memoryview | None:
        """The next buffer to write: the rest of a bulk frame, else control (small buffers
        joined into one), else the next bulk frame's header."""
        if (payload := self._payload) is not None:
            self._payload = None
            return memoryview(payload).cast("B")
        with self._lock:
            queue = self._control
            if not queue:
                if not self._bulk:
                    self._tx_idle = True
                    return None
                header, payload = self._bulk.popleft()
                if payload:
                    self._payload = payload
                return memoryview(header)
            first = queue.popleft()
            if len(first) >= _COALESCE or not queue or len(queue[0]) >= _COALESCE:
                return memoryview(first).cast("B")
            joined = bytearray(first)
            while queue and len(queue[0]) < _COALESCE and len(joined) < _COALESCE:
                joined += queue.popleft()
        return memoryview(joined)

    def _read(self) -> bool:
        """Read and decode up to the budget; True if more may be readable right now."""
        if self._rx_paused:
            with self._lock:
                self._rx_paused = self._must_pause()
            if self._rx_paused:
                return False
        decoder, sock = self._decoder, self.sock
        frames: list[Frame] = []
        budget = _READ_BUDGET
        error: TransportError | None = None
        more = False
        try:
            while True:
                try:
                    n = sock.recv_into(decoder.get_buffer())
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                if n == 0:
                    error = TransportError(f"{self.name} closed the connection")
                    break
                frames += decoder.advance(n)
                budget -= n
                if budget <= 0 or len(frames) >= RX_FRAMES_MAX:
                    more = True  # a batch the loop can take at once; come back for the rest
                    break
        except ProtocolError as exc:
            error = exc
        if error is None and sock.pending():
            more = True  # decrypted bytes wait inside OpenSSL, where epoll cannot see them
        if frames or error is not None:
            self._deliver(frames, error)
        if error is not None:
            self._reading = False
            return False
        return more and not self._rx_paused

    def _must_pause(self) -> bool:
        return len(self._rx) >= RX_FRAMES_MAX or self.queued - self.written > self.write_limit

    def _deliver(self, frames: list[Frame], error: TransportError | None) -> None:
        with self._lock:
            self._rx += frames
            if error is not None and self._rx_error is None:
                self._rx_error = error
            schedule = not self._rx_scheduled
            self._rx_scheduled = True
            self._rx_paused = self._must_pause()
        if schedule:
            self._call_soon(self._on_frames)

    def _wanted_events(self) -> int:
        mask = selectors.EVENT_READ if self._reading and not self._rx_paused else 0
        return mask | (selectors.EVENT_WRITE if self._want_write else 0)

    def _finish(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            # plain TCP shutdown: a TLS close_notify could block on a peer that stopped reading
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        self.sock.close()
        if self._pool is not None:
            self._call_soon(self._pool.release, self)
        self._call_soon(self._on_closed)


class IoThread:
    """One thread that owns the sockets of a set of channels."""

    def __init__(self, name: str) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._kicked: set[Channel] = set()
        self._wake_pending = False
        self._stop = False
        self.channels: set[Channel] = set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def kick(self, channels: Iterable[Channel]) -> None:
        """Ask the thread to service ``channels`` soon (one pipe write per batch of kicks)."""
        with self._lock:
            self._kicked.update(channels)
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def stop(self) -> None:
        """Close every socket left and end the thread."""
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(10)

    def _run(self) -> None:
        ready: set[Channel] = set()
        closing: set[Channel] = set()
        try:
            while not self._stop:
                timeout: float | None = None
                if ready:
                    timeout = 0
                elif closing:
                    timeout = max(0.0, min(c._close_by for c in closing) - time.monotonic())
                todo, ready = ready, set()
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        with self._lock:
                            todo |= self._kicked
                            self._kicked.clear()
                            self._wake_pending = False
                    else:
                        todo.add(key.data)
                todo |= closing
                for channel in todo:
                    try:
                        self._service(channel, ready, closing)
                    except Exception as exc:  # a bug: fail this connection, keep the others
                        log.exception("I/O thread failed on the connection to %s", channel.name)
                        channel._broken = True
                        channel._reading = channel._want_write = False
                        if channel._mask:
                            self._selector.unregister(channel.fd)
                            channel._mask = 0
                        channel._deliver([], TransportError(f"I/O failed: {exc!r}"))
        finally:
            for channel in list(self.channels):
                if not channel._done:
                    channel._finish()
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _service(self, channel: Channel, ready: set[Channel], closing: set[Channel]) -> None:
        if channel._service():
            self.channels.discard(channel)
            closing.discard(channel)
            if channel._mask:
                self._selector.unregister(channel.fd)
                channel._mask = 0
            return
        if channel._closing:
            closing.add(channel)
        if channel._more:
            ready.add(channel)
        mask = channel._wanted_events()
        if mask != channel._mask:
            if not channel._mask:
                self._selector.register(channel.fd, mask, channel)
            elif not mask:
                self._selector.unregister(channel.fd)
            else:
                self._selector.modify(channel.fd, mask, channel)
            channel._mask = mask


class IoPool:
    """A few :class:`IoThread`; each new channel goes to the one with the fewest.

    Used from one event loop: the kicks its callbacks ask for are sent to the threads once
    per loop iteration, so many small sends cost one thread wakeup, not one each.
    """

    def __init__(self, threads: int, name: str = "blobmesh-io") -> None:
        if threads < 1:
            raise ValueError("need at least one I/O thread")
        self._name = name
        self._size = threads
        self._threads: list[IoThread] = []
        self._owner: dict[Channel, IoThread] = {}
        self._deferred: set[Channel] = set()

    def attach(self, channel: Channel) -> None:
        """Hand ``channel`` (and its socket) to a thread; from now on only it touches it."""
        if len(self._threads) < self._size:  # threads start on first use
            self._threads.append(IoThread(f"{self._name}-{len(self._threads)}"))
        thread = min(self._threads, key=lambda t: len(t.channels))
        thread.channels.add(channel)
        self._owner[channel] = thread
        channel._pool = self
        self.defer_kick(channel)

    def defer_kick(self, channel: Channel) -> None:
        """Have ``channel``'s thread service it at the end of this loop iteration."""
        if not self._deferred:
            channel._loop.call_soon(self._kick_deferred)
        self._deferred.add(channel)

    def release(self, channel: Channel) -> None:
        """``channel``'s socket is closed: forget it (on the loop)."""
        self._owner.pop(channel, None)

    def _kick_deferred(self) -> None:
        channels, self._deferred = self._deferred, set()
        by_thread: dict[IoThread, list[Channel]] = {}
        for channel in channels:
            if (thread := self._owner.get(channel)) is not None:
                by_thread.setdefault(thread, []).append(channel)
        for thread, batch in by_thread.items():
            thread.kick(batch)

    def close(self) -> None:
        """Stop every thread (closing any socket still open)."""
        for thread in self._threads:
            thread.stop()
        self._threads.clear()
