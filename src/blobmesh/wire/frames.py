"""The frame codec: message types and length-prefixed frames (see ``docs/wire.md``).

A frame is ``length:u32be | version:u8 | header_len:u16be | header | payload``, where
``length`` counts every byte after itself, ``header`` is one msgpack-encoded message and
``payload`` (only :class:`Data` may carry one) is raw bytes.  Keeping bulk data out of the
msgpack header lets the sender write a caller's buffer without copying it.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from blobmesh.errors import ProtocolError

#: The frame-format version (the byte after the length); the protocol version is in the ALPN.
WIRE_VERSION: Final = 1
PREFIX: Final = struct.Struct(">IBH")
LENGTH_SIZE: Final = 4
MIN_FRAME_SIZE: Final = 16 * 1024
#: 1 MiB of payload plus headroom, so a 1 MiB chunk with its own headers is one frame
DEFAULT_MAX_FRAME_SIZE: Final = 1024 * 1024 + 4096
MAX_HEADER_SIZE: Final = 1024
#: Bytes of a frame that are not Data payload, rounded up (prefix + largest Data header).
DATA_OVERHEAD: Final = 32
MAX_PROTOCOL_NAME: Final = 128
MAX_REASON: Final = 512
#: Payload bytes a peer may have in flight to us over one connection, all streams together.
DEFAULT_CONNECTION_WINDOW: Final = 32 * 1024 * 1024

U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
U62 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]
StreamIdField = Annotated[int, msgspec.Meta(ge=1, lt=1 << 62)]
ProtocolName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PROTOCOL_NAME)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)]


class Hello(msgspec.Struct, array_like=True, frozen=True, tag=1):
    """First frame each side sends: the limits it enforces on what it receives."""

    max_frame_size: U32
    stream_window: U32
    max_message_size: U32
    max_streams: U32


class Open(msgspec.Struct, array_like=True, frozen=True, tag=2):
    """Open a stream speaking ``protocol``."""

    stream_id: StreamIdField
    protocol: ProtocolName


class Data(msgspec.Struct, array_like=True, frozen=True, tag=3):
    """A fragment of a message; the payload follows the header; ``more`` = not the last."""

    stream_id: StreamIdField
    more: bool


class Close(msgspec.Struct, array_like=True, frozen=True, tag=4):
    """The sender will send nothing more on this stream (half-close)."""

    stream_id: StreamIdField


class Reset(msgspec.Struct, array_like=True, frozen=True, tag=5):
    """Abort the stream in both directions."""

    stream_id: StreamIdField
    reason: Reason


class Credit(msgspec.Struct, array_like=True, frozen=True, tag=6):
    """The receiver of a stream allows ``amount`` more payload bytes."""

    stream_id: StreamIdField
    amount: U32


class Ping(msgspec.Struct, array_like=True, frozen=True, tag=7):
    """Keepalive probe; answered with a Pong carrying the same nonce."""

    nonce: U62


class Pong(msgspec.Struct, array_like=True, frozen=True, tag=8):
    """Answer to a Ping."""

    nonce: U62


class GoAway(msgspec.Struct, array_like=True, frozen=True, tag=9):
    """The sender accepts no new streams; open ones may finish."""

    reason: Reason


class ConnectionCredit(msgspec.Struct, array_like=True, frozen=True, tag=10):
    """The receiver allows ``amount`` more payload bytes on the connection, all streams.

    Each side sends one right after its Hello to grant its initial connection window.
    """

    amount: U32


Message = (Hello | Open | Data | Close | Reset | Credit | Ping | Pong | GoAway
           | ConnectionCredit)

#: Data payloads at least this large are received straight into their own ``bytes`` object.
DIRECT_PAYLOAD: Final = 64 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame; ``payload`` is empty except for Data."""

    message: Message
    payload: bytes = b""


def frame_header(message: Message, payload_size: int = 0) -> bytes:
    """Everything of a frame up to its payload (the payload is written after it as is)."""
    header = _encoder.encode(message)
    return PREFIX.pack(PREFIX.size - LENGTH_SIZE + len(header) + payload_size,
                       WIRE_VERSION, len(header)) + header


def encode_frame(message: Message, payload: bytes | memoryview = b"") -> bytes:
    """A whole frame as one bytes object (control frames, tests)."""
    return frame_header(message, len(payload)) + payload


_EMPTY_BIN: Final = b"\xc4\x00"  # msgpack bin 8 of length 0


def payload_head(empty: bytes, n: int) -> bytes:
    """For a msgpack message whose last field is a bin payload, encoded with that payload
    empty (``empty``): the bytes in front of an ``n``-byte payload.  The head followed by the
    payload is byte for byte the message encoded with it, so a service can send a large payload
    as it is (``Stream.send(payload, head=...)``) instead of copying it into an encoding."""
    if not empty.endswith(_EMPTY_BIN):
        raise ValueError("the message does not end with an empty bin field")
    if n < 1 << 8:
        size = b"\xc4" + n.to_bytes(1, "big")
    elif n < 1 << 16:
        size = b"\xc5" + n.to_bytes(2, "big")
    else:
        size = b"\xc6" + n.to_bytes(4, "big")
    return empty[:-len(_EMPTY_BIN)] + size


def _new_bytes(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A new ``n``-byte object and a writable view of its memory, to fill before anyone else
    sees it (what C code does with ``PyBytes_FromStringAndSize(NULL, n)``): a received payload
    lands in the ``bytes`` handed to the application without a copy.  Elsewhere than
    CPython a bytearray, converted (copied) at the end."""
    if _BYTES_DATA is None:
        scratch = bytearray(n)
        return scratch, memoryview(scratch)
    obj = _bytes_from_size(None, n)
    # the ctypes array does not own the memory; ``obj`` stays referenced while it is filled
    return obj, memoryview((ctypes.c_char * n).from_address(id(obj) + _BYTES_DATA)).cast("B")


if sys.implementation.name == "cpython":
    _bytes_from_size = ctypes.pythonapi.PyBytes_FromStringAndSize
    _bytes_from_size.restype = ctypes.py_object
    _bytes_from_size.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    _BYTES_DATA: int | None = bytes.__basicsize__ - 1  # offset of ob_sval (NUL included)
else:  # pragma: no cover
    _BYTES_DATA = None


@dataclass(slots=True)
class _Direct:
    """A large Data frame whose payload is being received into its own object."""

    message: Message
    payload: bytes | bytearray
    target: memoryview
    filled: int


class FrameDecoder:
    """Splits a byte stream into frames, enforcing ``max_frame_size`` before buffering a body.

    Bytes go in either with :meth:`feed` or, without a copy, by receiving straight into
    :meth:`get_buffer` and then calling :meth:`advance`; once the header of a Data frame with
    at least :data:`DIRECT_PAYLOAD` payload bytes is in, :meth:`get_buffer` is the rest of that
    payload's own ``bytes``, so the socket fills it and nothing copies it again.  Memory stays
    below twice the largest frame plus that payload.  Any malformed input raises
    :class:`ProtocolError`, after which the decoder is unusable.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < MIN_FRAME_SIZE or max_frame_size > 0xFFFF_FFFF:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, 2**32)")
        self.max_frame_size = max_frame_size
        self._buf = bytearray(2 * (LENGTH_SIZE + max_frame_size))
        self._view = memoryview(self._buf)  # never resized, so one export serves every call
        self._start = 0
        self._end = 0
        self._need = LENGTH_SIZE  # bytes from _start until the next frame can be decoded
        self._failed: ProtocolError | None = None
        self._direct: _Direct | None = None

    def get_buffer(self) -> memoryview:
        """Free space to receive into; always at least enough for the pending frame."""
        if (d := self._direct) is not None:
            return d.target[d.filled:]
        if len(self._buf) - self._start < self._need or self._end == len(self._buf):
            # move the partial frame to the front; it fits since the buffer holds two frames
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start:self._end]
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def advance(self, n: int) -> list[Frame]:
        """Account for ``n`` bytes written into the last :meth:`get_buffer`; decode frames."""
        if self._failed is not None:
            raise self._failed
        if (d := self._direct) is not None:
            if n < 0 or d.filled + n > len(d.target):
                raise ValueError("advance past the buffer")
            d.filled += n
            if d.filled < len(d.target):
                return []
            self._direct = None
            d.target.release()
            payload = d.payload if isinstance(d.payload, bytes) else bytes(d.payload)
            return [Frame(d.message, payload)]
        if n < 0 or self._end + n > len(self._buf):
            raise ValueError("advance past the buffer")
        self._end += n
        if self._end - self._start < self._need:
            return []  # the fast path while a large body trickles in
        try:
            return self._decode()
        except ProtocolError as exc:
            self._failed = exc
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode frames from ``data`` (copied into the buffer)."""
        frames: list[Frame] = []
        view = memoryview(data).cast("B")
        while view:
            space = self.get_buffer()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            view = view[n:]
            frames.extend(self.advance(n))
        return frames

    @property
    def failed(self) -> ProtocolError | None:
        """The error that made this decoder unusable, if any."""
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return self._end - self._start + (self._direct.filled if self._direct else 0)

    def _decode(self) -> list[Frame]:
        frames: list[Frame] = []
        buf, view = self._buf, self._view
        while self._end - self._start >= LENGTH_SIZE:
            start = self._start
            (length,) = struct.unpack_from(">I", buf, start)
            if length > self.max_frame_size:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of "
                                    f"{self.max_frame_size}")
            if length < PREFIX.size - LENGTH_SIZE:
                raise ProtocolError(f"frame of {length} bytes is too short")
            end = start + LENGTH_SIZE + length
            if self._end - start < PREFIX.size:
                self._need = PREFIX.size
                break
            _, version, header_len = PREFIX.unpack_from(buf, start)
            if version != WIRE_VERSION:
                raise ProtocolError(f"unsupported wire version {version}")
            header_end = start + PREFIX.size + header_len
            if header_len == 0 or header_len > MAX_HEADER_SIZE or header_end > end:
                raise ProtocolError(f"bad frame header length {header_len}")
            complete = self._end >= end
            if not complete and (end - header_end < DIRECT_PAYLOAD or self._end < header_end):
                self._need = (end if end - header_end < DIRECT_PAYLOAD else header_end) - start
                break
            try:
                message = _decoder.decode(view[start + PREFIX.size:header_end])
            except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
                # msgspec reports invalid UTF-8 in a str as UnicodeDecodeError
                raise ProtocolError(f"malformed frame header: {exc}") from exc
            if header_end < end and not isinstance(message, Data):
                raise ProtocolError(f"{type(message).__name__} frame carries a payload")
            self._need = LENGTH_SIZE
            if not complete:  # the rest of a large payload goes straight into its object
                payload, target = _new_bytes(end - header_end)
                got = self._end - header_end
                target[:got] = view[header_end:self._end]
                self._direct = _Direct(message, payload, target, got)
                self._start = self._end = 0
                return frames
            frames.append(Frame(message, bytes(view[header_end:end]) if header_end < end
                                else b""))
            self._start = end
        if self._start == self._end:
            self._start = self._end = 0
        return frames
