"""The frame codec, byte for byte (vectors also in docs/wire.md)."""

from __future__ import annotations

import struct

import msgspec
import pytest

from blobmesh.errors import ProtocolError
from blobmesh.wire import (
    Close,
    ConnectionCredit,
    Credit,
    Data,
    Frame,
    FrameDecoder,
    GoAway,
    Hello,
    Message,
    Open,
    Ping,
    Pong,
    Reset,
    encode_frame,
    frame_header,
)
from blobmesh.wire.frames import (
    DIRECT_PAYLOAD,
    LENGTH_SIZE,
    MIN_FRAME_SIZE,
    PREFIX,
    payload_head,
)

VECTORS: list[tuple[Message, bytes, str]] = [
    # length, version, header length, msgpack header, payload
    (Hello(1048576, 8388608, 8388608, 1024), b"",
     "00000017 01 0014 9501ce00100000ce00800000ce00800000cd0400"),
    (Open(1, "echo"), b"", "0000000b 01 0008 930201a46563686f"),
    (Data(1, False), b"hi", "00000009 01 0004 930301c2 6869"),
    (Close(3), b"", "00000006 01 0003 920403"),
    (Reset(2, "no"), b"", "00000009 01 0006 930502a26e6f"),
    (Credit(1, 65536), b"", "0000000b 01 0008 930601ce00010000"),
    (Ping(7), b"", "00000006 01 0003 920707"),
    (Pong(7), b"", "00000006 01 0003 920807"),
    (GoAway("idle"), b"", "0000000a 01 0007 9209a469646c65"),
]


@pytest.mark.parametrize(("message", "payload", "hex_"), VECTORS)
def test_vectors(message: Message, payload: bytes, hex_: str) -> None:
    wire = bytes.fromhex(hex_.replace(" ", ""))
    assert encode_frame(message, payload) == wire
    assert FrameDecoder().feed(wire) == [Frame(message, payload)]


def test_byte_at_a_time_and_all_at_once() -> None:
    frames = [Frame(m, p) for m, p, _ in VECTORS] + [Frame(Data(5, True), bytes(range(256)) * 9)]
    wire = b"".join(encode_frame(f.message, f.payload) for f in frames)
    assert FrameDecoder().feed(wire) == frames
    dec = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += dec.feed(wire[i:i + 1])
    assert got == frames and dec.buffered == 0


def test_receive_into_buffer_with_large_frames() -> None:
    size = MIN_FRAME_SIZE
    dec = FrameDecoder(size)
    payloads = [bytes([i]) * (size - 32) for i in range(7)]
    wire = b"".join(encode_frame(Data(1, True), p) for p in payloads)
    got: list[Frame] = []
    pos = 0
    step = 5000  # unaligned with frames: exercises compaction
    while pos < len(wire):
        with dec.get_buffer() as buf:
            n = min(len(buf), step, len(wire) - pos)
            buf[:n] = wire[pos:pos + n]
        got += dec.advance(n)
        pos += n
    assert [f.payload for f in got] == payloads


def test_frame_of_exactly_max_size() -> None:
    dec = FrameDecoder(MIN_FRAME_SIZE)
    header = frame_header(Data(1, False), 0)
    payload = bytes(MIN_FRAME_SIZE - (len(header) - LENGTH_SIZE))
    frame = encode_frame(Data(1, False), payload)
    assert len(frame) == LENGTH_SIZE + MIN_FRAME_SIZE
    assert dec.feed(frame)[0].payload == payload
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        dec.feed(encode_frame(Data(1, False), payload + b"x"))


def test_oversized_rejected_from_the_length_alone() -> None:
    dec = FrameDecoder(MIN_FRAME_SIZE)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(struct.pack(">I", 0xFFFFFFFF))  # no body needed to refuse
    with pytest.raises(ProtocolError):  # and it stays failed
        dec.feed(encode_frame(Ping(1)))


def _raw(header: bytes, payload: bytes = b"", version: int = 1,
         header_len: int | None = None) -> bytes:
    hl = len(header) if header_len is None else header_len
    return PREFIX.pack(3 + len(header) + len(payload), version, hl) + header + payload


@pytest.mark.parametrize(("wire", "reason"), [
    (struct.pack(">I", 2) + b"\x01\x00", "too short"),
    (_raw(b"\x92\x07\x01", version=2), "version"),
    (_raw(b"\x92\x07\x01", header_len=0), "header length"),
    (_raw(b"\x92\x07\x01", header_len=4), "header length"),
    (_raw(b"\x92\x63\x01"), "malformed"),  # unknown type tag 99
    (_raw(b"\x92\x07\xff"), "malformed"),  # negative nonce
    (_raw(b"\x92\x07"), "malformed"),  # truncated msgpack
    (_raw(b"\x92\x02\x01"), "malformed"),  # Open missing its protocol
    (_raw(b"\x93\x02\x00\xa1x"), "malformed"),  # stream id 0
    (_raw(b"\x93\x02\x01\xa0"), "malformed"),  # empty protocol name
    (_raw(b"\xc1"), "malformed"),  # reserved msgpack byte
    (_raw(b"\x92\x07\x01", b"xx"), "carries a payload"),
])
def test_malformed(wire: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder().feed(wire)


def test_limits_validated() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(100)


def test_connection_credit_vector() -> None:
    wire = bytes.fromhex("0000000a 01 0007 920ace02000000".replace(" ", ""))
    assert encode_frame(ConnectionCredit(32 * 1024 * 1024)) == wire
    assert FrameDecoder().feed(wire) == [Frame(ConnectionCredit(32 * 1024 * 1024))]


def test_large_payload_received_straight_into_its_bytes() -> None:
    """Like a TLS socket: 16 KiB records into get_buffer(); the payload is never copied."""
    payloads = [bytes([i]) * (DIRECT_PAYLOAD + 1000 * i) for i in range(3)] + [b"tiny"]
    wire = b"".join(encode_frame(Data(1, i < 3), p) for i, p in enumerate(payloads))
    dec = FrameDecoder()
    got: list[Frame] = []
    pos = 0
    while pos < len(wire):
        buf = dec.get_buffer()
        n = min(len(buf), 16384, len(wire) - pos)
        buf[:n] = wire[pos:pos + n]
        got += dec.advance(n)
        pos += n
        assert dec.buffered <= DIRECT_PAYLOAD + 3000 + 64
    assert [f.payload for f in got] == payloads
    assert all(type(f.payload) is bytes for f in got)
    assert dec.buffered == 0
    first = encode_frame(Data(1, False), payloads[0])
    dec.advance(_put(dec, first[:16384]))
    assert len(dec.get_buffer()) == len(first) - 16384  # exactly the rest of that payload


def _put(dec: FrameDecoder, data: bytes) -> int:
    dec.get_buffer()[:len(data)] = data
    return len(data)


@pytest.mark.parametrize("n", [0, 255, 256, 65535, 65536, 1 << 20])
def test_payload_head_is_the_encoding_up_to_the_payload(n: int) -> None:
    payload = bytes(i % 253 for i in range(n))
    empty = msgspec.msgpack.encode([7, "x", b""])
    assert payload_head(empty, n) + payload == msgspec.msgpack.encode([7, "x", payload])


def test_payload_head_needs_an_empty_last_bin_field() -> None:
    with pytest.raises(ValueError, match="empty bin"):
        payload_head(msgspec.msgpack.encode([7, b"x"]), 3)
