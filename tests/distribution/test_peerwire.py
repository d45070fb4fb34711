"""The swarm protocol state machine, with no sockets."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobmesh.distribution.peerwire import (
    LayerArrived,
    PeerHas,
    PeerHello,
    PieceArrived,
    PieceWanted,
    SwarmSession,
)
from blobmesh.errors import ProtocolError
from blobmesh.hashing import BlobId
from blobmesh.types import Bitfield

BLOB = BlobId(b"\x01" * 32)
SIZE, PIECE = 1_000_000, 262144  # 4 pieces


def pair() -> tuple[SwarmSession, SwarmSession]:
    a, b = SwarmSession(BLOB, SIZE, PIECE), SwarmSession(BLOB, SIZE, PIECE)
    have = Bitfield(4)
    have.update([0, 2])
    hello = b.receive(a.hello(have, True, 1))
    assert isinstance(hello, PeerHello) and list(hello.have) == [0, 2] and hello.priority == 1
    a.receive(b.hello(Bitfield(4), False, 1))
    return a, b


def piece(s: SwarmSession, index: int, data: bytes) -> bytes:
    """The message ``s`` sends for a piece: its head, then the piece's bytes."""
    return s.piece_head(index, len(data)) + data


def test_piece_head_and_bytes_are_the_encoded_message() -> None:
    _, b = pair()
    for n in (0, 255, 256, 65536):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        assert piece(b, 2, data) == msgspec.msgpack.encode(["piece", 2, data])


def test_request_piece_roundtrip() -> None:
    a, b = pair()
    assert b.receive(a.request(1)) == PieceWanted(1)
    got = a.receive(piece(b, 1, b"x" * 10))
    assert got == PieceArrived(1, b"x" * 10)
    assert a.outstanding == set()
    assert b.receive(a.haves([3, 1])) == PeerHas([3, 1])
    assert 3 in b.peer_have and 1 in b.peer_have


def test_unsolicited_piece_and_layer_rejected() -> None:
    a, b = pair()
    with pytest.raises(ProtocolError, match="unsolicited piece"):
        a.receive(piece(b, 1, b"x"))
    with pytest.raises(ProtocolError, match="unsolicited piece layer"):
        a.receive(b.layer(b"\0" * 128))
    b.request_layer()
    assert b.receive(a.layer(b"\0" * 128)) == LayerArrived(b"\0" * 128)


def test_out_of_range_and_oversized() -> None:
    a, b = pair()
    with pytest.raises(ProtocolError, match="out of range"):
        b.receive(msgspec.msgpack.encode(["req", 4]))
    a.request(0)
    with pytest.raises(ProtocolError, match="oversized"):
        a.receive(piece(b, 0, b"x" * (PIECE + 1)))


def test_hello_must_come_first_and_match() -> None:
    s = SwarmSession(BLOB, SIZE, PIECE)
    with pytest.raises(ProtocolError, match="before hello"):
        s.receive(msgspec.msgpack.encode(["haves", [0]]))
    other = SwarmSession(BlobId(b"\x02" * 32), SIZE, PIECE)
    with pytest.raises(ProtocolError, match="another blob"):
        s.receive(other.hello(Bitfield(4), False, 0))


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    a, _ = pair()
    with contextlib.suppress(ProtocolError):
        a.receive(data)


def test_a_piece_crossing_a_cancel_is_late_not_a_violation() -> None:
    a, b = pair()
    b.receive(a.request(1))
    b.receive(a.request(2))
    b.receive(a.cancel(1))  # end game: the copy came from elsewhere
    b.receive(a.cancel(2))
    # before: "unsolicited piece 1", and the connection was reset
    assert a.receive(piece(b, 1, b"x")) == PieceArrived(1, b"x", late=True)
    assert a.receive(b.reject(2, "gone")) is None  # a refusal that crossed it: dropped
    assert a.outstanding == set()
    with pytest.raises(ProtocolError, match="unsolicited piece 1"):
        a.receive(piece(b, 1, b"x"))  # but only once
    with pytest.raises(ProtocolError, match="unsolicited piece 3"):
        a.receive(piece(b, 3, b"x"))  # never asked for


def test_haves_and_have_all_pass_on_only_pieces_not_known_yet() -> None:
    a, b = pair()  # b knows a holds 0 and 2
    assert b.receive(a.haves([2])) is None  # nothing new
    assert b.receive(a.haves([2, 3])) == PeerHas([3])
    assert b.receive(a.have_all()) == PeerHas([1]) and b.peer_complete
    assert b.receive(a.have_all()) is None
    with pytest.raises(ProtocolError, match="haves names 0 pieces"):
        b.receive(msgspec.msgpack.encode(["haves", []]))
    with pytest.raises(ProtocolError, match="out of range"):
        b.receive(msgspec.msgpack.encode(["haves", [1, 4]]))


def test_a_hello_of_version_1_is_refused_by_name() -> None:
    s = SwarmSession(BLOB, SIZE, PIECE)
    old = msgspec.msgpack.encode(["hello", 1, BLOB.digest, SIZE, PIECE, b"\0", False, 1])
    with pytest.raises(ProtocolError, match="version 1 of blobmesh-swarm/1, this node "
                                            "version 2"):
        s.receive(old)
    with pytest.raises(ProtocolError):  # version 1's have is no message any more
        pair()[1].receive(msgspec.msgpack.encode(["have", 0]))
